"""`fedlora exposure`: how much of a secret of your own a model gives away. Every digit string of
the secret's shape is a candidate ("4 7 1": 1,000 of them); each is scored as the answer to your
prompt under the base model and under each adapter (a run's final/ or a checkpoint, or an
adapter a site sent), and the exposure is log2(candidates) - log2(rank of the true secret)
(Carlini et al., "The Secret Sharer", 2019): about 1 bit for a model that knows nothing of it,
log2(candidates) for one that ranks it first. Plant the record in a site's data first (as a
question: instruction/output; or as raw text: prompt/completion with --raw), run the
federation, then ask what each party holds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora exposure`."""
    p.add_argument("--model", default="smollm2-135m",
                   help="the base model the adapters were trained on (as the model setting)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="an adapter folder to score (PeftModel.from_pretrained loads it); "
                        "repeat for several; the base model is always scored")
    p.add_argument("--prompt", required=True,
                   help='what the secret is asked with, as it was trained: "What is the vault '
                        'code of Ines Varga?"')
    p.add_argument("--answer", required=True,
                   help='the answer as it was trained, with {secret} where the secret goes: '
                        '"The vault code of Ines Varga is {secret}."')
    p.add_argument("--secret", required=True,
                   help='the true secret as it was written, e.g. "4 7 1" (its digits are '
                        'varied: 10**digits candidates, at most 6 digits)')
    p.add_argument("--raw", action="store_true",
                   help="the record was raw text (prompt/completion): score without the chat "
                        "template (default: a question, as instruction/output records train)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--output-dir", default=None,
                   help="write exposure.json there: every candidate's score under each model")


def adapters_of(specs: list[str]) -> dict[str, Path]:
    """{name: folder} of the --adapter [NAME=]DIR arguments (name: the folder's path)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (spec, "", spec)
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {spec}: expected a folder with adapter_config.json (a "
                             f"run's final/ or a saved PEFT adapter), got {folder}")
        if name in out or name == "base":
            raise ValueError(f"--adapter {spec}: the name {name!r} is taken; name them NAME=DIR")
        out[name] = folder
    return out


def run(args: argparse.Namespace) -> int:
    """Score the candidates under the base model and each adapter; print the table."""
    from fedlora.audit.canaries import OwnSecret

    secret = OwnSecret(args.prompt, args.answer, args.secret, raw=args.raw)
    adapters = adapters_of(args.adapter)
    from peft import PeftModel

    from fedlora.audit.run import score_view
    from fedlora.config import ModelSettings
    from fedlora.models import load_model

    base = ModelSettings(name=args.model, device=args.device)
    model, tokenizer, _ = load_model(base)
    views = {"base": score_view(model, tokenizer, [secret])[0]}
    for name, folder in adapters.items():
        print(f"fedlora: scoring {len(secret.candidates())} candidates under {name}",
              file=sys.stderr, flush=True)
        if name != next(iter(adapters)):  # a fresh base for each adapter
            model, tokenizer, _ = load_model(base)
        tuned = PeftModel.from_pretrained(model, str(folder))
        views[name] = score_view(tuned, tokenizer, [secret])[0]
    width = max(len(n) for n in views)
    print(f"exposure of {secret.answer()!r} in bits (log2 {len(secret.candidates())} "
          f"candidates - log2 rank of the true secret)")
    for name, view in views.items():
        print(f"{name:{width}}  {view['exposure']:6.2f} bits  rank {view['rank']} of "
              f"{view['candidates']}")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "exposure.json").write_text(json.dumps(
            {"prompt": secret.prompt, "answer": secret.template, "secret": secret.secret,
             "raw": secret.raw, "model": args.model,
             "views": {n: {**v, "adapter": str(adapters.get(n, ""))} for n, v in views.items()}},
            indent=1) + "\n")
        print(f"every candidate's score: {out / 'exposure.json'}")
    return 0
