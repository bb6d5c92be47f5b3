"""`fedlora server`: the aggregation server of a real deployment (Flower SuperLink + ServerApp).

Starts a `flower-superlink` on 127.0.0.1 (TLS with certificate, key and CA; SuperNode
authentication with the allowed public keys; a state database in --output-dir) and, on the
address given, the fleet gate (server/fleet_gate.py) that lets only the Fleet API through, so a
participant can join but cannot submit, list or stop runs. It then submits the
fedlora run to it, waits for --min-nodes client nodes, streams the progress, writes metrics,
per-round adapters and the final adapter to --output-dir, and stops everything it started
when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from fedlora.cli.simulate import add_run_arguments, build_config, prepare_output, report_result
from fedlora.config import SettingsError

DEFAULT_ADDRESS = "127.0.0.1:9092"
CERT_FILES = ("ca.crt", "server.pem", "server.key")  # what `fedlora certs` writes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora server`."""
    p.add_argument("--address", default=DEFAULT_ADDRESS,
                   help=f"HOST:PORT client nodes connect to; only the Fleet API they use "
                        f"is served here (default {DEFAULT_ADDRESS}; 0.0.0.0:PORT for every "
                        f"interface)")
    p.add_argument("--control-port", type=int, default=None, metavar="PORT",
                   help="port of the Control API (`flwr ls`, `flwr stop`, `flwr supernode "
                        "ls`), on 127.0.0.1 only: participants cannot submit, list or stop "
                        "runs (default: the --address port + 1)")
    p.add_argument("--min-nodes", type=int, default=None,
                   help="client nodes that must be connected before a round starts (default 2)")
    p.add_argument("--certs-dir", type=Path,
                   help="folder with ca.crt, server.pem and server.key (as `fedlora certs` "
                        "writes them): serve TLS")
    p.add_argument("--authorized-keys", type=Path, nargs="+", metavar="PUBKEY",
                   help="SuperNode public keys (.pub) allowed to join; turns on node "
                        "authentication (needs --certs-dir)")
    p.add_argument("--insecure", action="store_true",
                   help="serve without TLS on a non-loopback address (traffic and the "
                        "run-submission API are then open to anyone on the network)")
    from server.fleet_gate import add_limit_arguments

    add_limit_arguments(p.add_argument_group(
        "fleet gate limits", "what one source (an IPv4 address or IPv6 /64; all nodes behind "
        "a NAT share one) and everyone together may ask of the public address before node "
        "authentication; see docs/deployment.md"), prefix="gate-")
    add_run_arguments(p)


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port), or a ValueError saying what was expected."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--address: expected HOST:PORT such as {DEFAULT_ADDRESS} or "
                         f"0.0.0.0:9092, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_files(certs_dir: Path | None) -> tuple[Path, Path, Path] | None:
    """(ca, cert, key) from --certs-dir, checked to exist."""
    if certs_dir is None:
        return None
    files = tuple(certs_dir / name for name in CERT_FILES)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"--certs-dir {certs_dir}: missing {', '.join(missing)}; make "
                                f"them with `fedlora certs --out {certs_dir} --host <server>`")
    return files  # type: ignore[return-value]


def superlink_spec(args: argparse.Namespace, out_dir: Path):
    """The SuperLinkSpec for these flags, refusing an unprotected public address."""
    from fedlora.runtime.superlink import SuperLinkSpec

    host, port = parse_address(args.address)
    control = port + 1 if args.control_port is None else args.control_port
    if not 0 < control < 65536 or control == port:
        raise ValueError(f"--control-port: expected a free port other than the --address "
                         f"port {port}, got {control}")
    tls = tls_files(args.certs_dir)
    if tls is None and not is_loopback(host) and not args.insecure:
        raise ValueError(
            f"--address {args.address} is reachable from other machines, but no --certs-dir "
            f"was given: without TLS the LoRA factors travel in clear text and anyone who "
            f"reaches the port can submit runs. Pass --certs-dir (see `fedlora certs`), or "
            f"--insecure to accept that on a trusted network")
    keys = tuple(args.authorized_keys or ())
    if keys and tls is None:
        raise ValueError("--authorized-keys needs --certs-dir: Flower's SuperNode "
                         "authentication only works over TLS")
    for key in keys:
        if not key.is_file():
            raise FileNotFoundError(f"--authorized-keys: {key} does not exist")
    ca, cert, key_file = tls or (None, None, None)
    from server.fleet_gate import limit_argv, limits_from_args

    gate_flags = tuple(limit_argv(limits_from_args(args, prefix="gate-")))
    return SuperLinkSpec(simulation=False, host=host, port=port, control_port=control,
                         ca_cert=ca, cert=cert,
                         key=key_file, supernode_auth=bool(keys), authorized_keys=keys,
                         database=out_dir / "superlink.db", gate_flags=gate_flags)


def run(args: argparse.Namespace) -> int:
    """Validate, pre-check the model, serve the run, print the summary; the exit code."""
    config, min_nodes = build_config(args, clients_flag="min_nodes")
    from fedlora.methods import load_settings

    settings = load_settings(config)
    if settings.attack.on:
        raise SettingsError(
            f"setting 'attack': simulated hostile clients (attack={settings.attack.attack}) are "
            f"for fedlora simulate; a deployment server never asks its nodes to attack, and "
            f"they would refuse: remove attack from the run config")
    out_dir = Path(config["output-dir"])
    spec = superlink_spec(args, out_dir)
    if not settings.federation.resume:
        prepare_output(out_dir, args.overwrite)
    from fedlora.preflight import check_model
    from fedlora.runtime.superlink import run_app

    print(f"fedlora: checking model {settings.model.name!r} ...", file=sys.stderr)
    check_model(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not settings.federation.resume:  # a resumed server keeps the SuperLink's node registry,
        for name in ("superlink.db", "superlink.db-wal", "superlink.db-shm"):  # so the nodes
            (out_dir / name).unlink(missing_ok=True)  # reconnect by themselves
    print(f"fedlora: serving on {args.address} ({'TLS' if spec.tls else 'insecure'}"
          f"{', node authentication' if spec.supernode_auth else ''}), waiting for "
          f"{min_nodes} nodes; {settings.federation.num_rounds} rounds of "
          f"{settings.federation.strategy} -> {out_dir}", file=sys.stderr)
    code = run_app(config, spec, log_file=out_dir / "superlink.log", output_dir=out_dir)
    return report_result(out_dir, code, "run")
