"""Entry point of the `fedlora` command."""

from __future__ import annotations

import argparse
import sys

from fedlora import __version__
from fedlora.cli import (
    audit,
    certs,
    client,
    export,
    exposure,
    generate,
    mix,
    report,
    server,
    settings,
    simulate,
)
from fedlora.config import SettingsError
from fedlora.runtime.quiet import quiet

# Errors a user can fix from the message alone: print it, no traceback, exit code 2.
USER_ERRORS = (SettingsError, ValueError, FileNotFoundError, FileExistsError, KeyError)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per user journey."""
    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated LoRA/QLoRA fine-tuning on Flower.")
    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("simulate", help="run a local multi-client simulation",
                       description="Run a local multi-client simulation on Flower's Simulation "
                                   "Engine; writes metrics.jsonl, rounds/<n>/ and final/ "
                                   "(PEFT adapters) to --output-dir.")
    simulate.add_arguments(p)
    p.set_defaults(func=simulate.run)
    p = sub.add_parser("server", help="start the aggregation server of a deployment",
                       description=server.__doc__.splitlines()[0] + " " + " ".join(
                           server.__doc__.splitlines()[2:]).strip())
    server.add_arguments(p)
    p.set_defaults(func=server.run)
    p = sub.add_parser("client", help="launch a client node that joins a server",
                       description=" ".join(client.__doc__.splitlines()).strip())
    client.add_arguments(p)
    p.set_defaults(func=client.run)
    p = sub.add_parser("certs", help="make a CA, a server certificate and node keys",
                       description=" ".join(certs.__doc__.splitlines()).strip())
    certs.add_arguments(p)
    p.set_defaults(func=certs.run)
    p = sub.add_parser("export", help="merge an adapter into its base model (plain HF model)",
                       description="Fold a fedlora/PEFT adapter into its base model and save a "
                                   "model that loads with AutoModelForCausalLM.from_pretrained.")
    export.add_arguments(p)
    p.set_defaults(func=export.run)
    p = sub.add_parser("mix", help="compose LoRA adapters into one (fixed or searched "
                                   "weights, LoraHub)",
                       description=" ".join(mix.__doc__.split(": ", 1)[1].split()))
    mix.add_arguments(p)
    p.set_defaults(func=mix.run)
    p = sub.add_parser("generate", help="answer a prompt (or chat) with a base model + adapter",
                       description=generate.__doc__.split(": ", 1)[1].strip())
    generate.add_arguments(p)
    p.set_defaults(func=generate.run)
    p = sub.add_parser("report", help="plot and summarise finished runs (PNG + report.md)",
                       description=report.__doc__.split(": ", 1)[1].strip())
    report.add_arguments(p)
    p.set_defaults(func=report.run)
    p = sub.add_parser("settings", help="list every run-config key with default and help, "
                                        "and which strategy works with what",
                       description=settings.__doc__.split(": ", 1)[1].strip())
    settings.add_arguments(p)
    p.set_defaults(func=settings.run)
    p = sub.add_parser("audit", help="measure what each party can read of one site's "
                                     "records (planted canaries), per privacy setting",
                       description=" ".join(audit.__doc__.split(": ", 1)[1].split()))
    audit.add_arguments(p)
    p.set_defaults(func=audit.run)
    p = sub.add_parser("exposure", help="how much of a secret of your own a model or adapter "
                                        "gives away (bits of exposure)",
                       description=" ".join(exposure.__doc__.split(": ", 1)[1].split()))
    exposure.add_arguments(p)
    p.set_defaults(func=exposure.run)
    for p in (parser, *sub.choices.values()):  # before or after the command
        p.add_argument("--verbose", action="store_true",
                       default=False if p is parser else argparse.SUPPRESS,
                       help="show everything the dependencies print (torch, transformers, "
                            "Flower, Ray warnings); by default only fedlora's own progress "
                            "and every error")
    return parser


def model_load_error(err: Exception) -> bool:
    """Whether `err` is fedlora.models' ModelLoadError, without importing fedlora.models
    (torch) into a command that never loaded a model: `fedlora client` stays a light
    process for as long as its node runs."""
    models = sys.modules.get("fedlora.models")
    return models is not None and isinstance(err, models.ModelLoadError)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the sub-command, turn user errors into one clear line."""
    args = build_parser().parse_args(argv)
    quiet(verbose=args.verbose)
    try:
        return args.func(args)
    except Exception as err:
        if not isinstance(err, USER_ERRORS) and not model_load_error(err):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"fedlora: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
