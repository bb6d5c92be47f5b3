"""`fedlora audit`: plant random canaries (secrets) in one site's data, run a federation per
privacy setting, and report how much of each secret the server (from that site's reply, or from
the sum only), the final global adapter and the base model give away, in bits of exposure
(Carlini et al. 2019), with the accuracy each setting costs on the default task. Every
candidate's score is kept in <output-dir>/results.json; the table goes to summary.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora audit`."""
    from fedlora.audit.run import ARMS, AuditPlan

    plan = AuditPlan()
    p.add_argument("--output-dir", default="fedlora-audit",
                   help="results.json (every candidate's score), summary.md, one run per arm")
    p.add_argument("--model", default=plan.model, help="base model (as the model setting)")
    p.add_argument("--arms", default=",".join(ARMS),
                   help="settings to audit, comma-separated: " + ", ".join(
                       f"{name} ({' '.join(f'{k}={v}' for k, v in extra.items()) or 'as is'})"
                       for name, extra in ARMS.items()))
    p.add_argument("--sites", type=int, default=plan.sites, help="sites in the federation")
    p.add_argument("--records-per-site", type=int, default=plan.records_per_site,
                   help="ordinary records of the default task each site holds")
    p.add_argument("--canaries", type=int, default=plan.canaries,
                   help="distinct secrets planted in site 0's data")
    p.add_argument("--copies", type=int, default=plan.copies,
                   help="copies of each canary in site 0's data")
    p.add_argument("--digits", type=int, default=plan.digits,
                   help="digits of each secret (10**digits candidates are ranked)")
    p.add_argument("--rounds", type=int, default=plan.rounds, help="federated rounds")
    p.add_argument("--local-steps", type=int, default=plan.local_steps,
                   help="optimizer steps per round at each site (80 = about 3 epochs of 104 "
                        "records at batch size 4)")
    p.add_argument("--accuracy-examples", type=int, default=plan.accuracy_examples,
                   help="held-out records of the default task scored with the final adapter")
    p.add_argument("--seed", type=int, default=plan.seed,
                   help="seed of the canaries, the data and the federation")
    p.add_argument("--run-config", default="",
                   help='more settings for every arm, as fedlora simulate takes them: '
                        '"lr=0.001 lora-rank=8"')


def run(args: argparse.Namespace) -> int:
    """Run the audit; print the table (stdout) and progress (stderr)."""
    from fedlora.audit.run import AuditPlan, run_audit, table
    from fedlora.cli.runconfig import parse_run_config

    plan = AuditPlan(model=args.model, sites=args.sites, records_per_site=args.records_per_site,
                     canaries=args.canaries, copies=args.copies, digits=args.digits,
                     rounds=args.rounds, local_steps=args.local_steps, seed=args.seed,
                     accuracy_examples=args.accuracy_examples,
                     arms=[a.strip() for a in args.arms.split(",") if a.strip()],
                     run_config=parse_run_config(args.run_config))
    report = run_audit(plan, Path(args.output_dir),
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"exposure in bits (log2 {report['candidates']} candidates - log2 rank); "
          f"reply = site 0's round-1 reply as the server receives it, sum = the round-1 merge, "
          f"final = the global adapter after round {plan.rounds}")
    print(table(report["summary"]))
    print(f"results: {Path(args.output_dir) / 'results.json'}")
    return 0
