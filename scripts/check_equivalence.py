"""Does a refactoring change any number? Run the same seeded federations on two commits.

    .venv/bin/python scripts/check_equivalence.py --ref <commit>      # <commit> vs the work tree

Each scenario (every strategy, with mixed ranks where it allows them, plus server optimiser,
clipping, DP, client clipping, rank pruning and server-side evaluation) runs the real
ServerApp and ClientApp in one fresh process per scenario over this tree's in-process grid
(simulations/inprocess.py; tiny-llama, 3 clients, 2 rounds), once in a git worktree of `--ref` and
once in this tree. Then it compares every number of metrics.jsonl (all but the wall-clock
`*seconds`) and every tensor the run wrote (rounds/<n>/, final/, state/, personal/) bitwise,
and prints one line per scenario. Exit code 0 when everything is equal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = {"model": "tiny-llama", "device": "cpu", "num-server-rounds": 2, "local-steps": 3,
        "lr": 0.01, "dataset-size": 150, "eval-examples": 8, "eval-accuracy": 4,
        "max-new-tokens": 8, "min-available-nodes": 3, "min-train-nodes": 2,
        "min-evaluate-nodes": 2}
MIXED = {"client-ranks": "4,8,16"}
SCENARIOS: dict[str, dict] = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    "ffa-lora": {"strategy": "ffa-lora", **MIXED},
    "fedsa-lora": {"strategy": "fedsa-lora"},
    "hetlora": {"strategy": "hetlora", **MIXED},
    "hetlora-examples-prune": {"strategy": "hetlora", **MIXED, "hetlora-weighting": "examples",
                               "hetlora-prune": 0.9},
    "flexlora": {"strategy": "flexlora", **MIXED},
    "flexlora-export-rank": {"strategy": "flexlora", **MIXED, "export-rank": 20},
    "flora": {"strategy": "flora", **MIXED},
    "fedex-lora": {"strategy": "fedex-lora", "residual-rank": 12},
    "fedavg-fedadam": {"strategy": "fedavg", "server-optimizer": "fedadam"},
    "fedavg-dp": {"strategy": "fedavg", "clip-norm": 0.05, "dp-noise-multiplier": 0.5},
    "ffa-lora-client-clip": {"strategy": "ffa-lora", **MIXED, "clip-norm": 0.02,
                             "dp-clipping": "client"},
    "fedavg-server-eval-fp16": {"strategy": "fedavg", "server-eval": 6,
                                "wire-dtype": "float16"},
}


def run_one(tree: Path, name: str, out_dir: Path) -> None:
    """Run scenario `name` with the code of `tree` in a fresh process."""
    code = (
        "import sys, importlib.util; sys.path[:0] = [{tree!r}]\n"
        # this tree's grid module by its file (the older tree may not have it), whose apps
        # (clients.client_app, server.server_app) are imported from `tree`
        "spec = importlib.util.spec_from_file_location('inprocess', {grid!r})\n"
        "grid = sys.modules['inprocess'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(grid)\n"
        "grid.run_inprocess({cfg!r}, 3)\n"
    ).format(tree=str(tree), grid=str(ROOT / "simulations" / "inprocess.py"),
             cfg={**BASE, **SCENARIOS[name], "output-dir": str(out_dir),
                  "personal-dir": str(out_dir / "personal")})
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                          text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed in {tree}:\n{proc.stderr[-3000:]}")


def numbers(value, path: str = "") -> dict[str, object]:
    """Flatten a metrics value into {path: leaf}."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items()
                for k, v in numbers(sub, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, sub in enumerate(value)
                for k, v in numbers(sub, f"{path}[{i}]").items()}
    return {path: value}


def metric_differences(old: Path, new: Path) -> list[str]:
    """Paths whose values differ between the two metrics.jsonl files (seconds ignored)."""
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (old, new)]
    if len(rows[0]) != len(rows[1]):
        return [f"{len(rows[0])} vs {len(rows[1])} metrics lines"]
    diffs = []
    for a, b in zip(*rows):
        fa, fb = numbers(a), numbers(b)
        for key in sorted(set(fa) | set(fb)):
            if key.endswith("seconds"):  # wall-clock times (seconds, train-seconds, ...)
                continue
            va, vb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
            same = va == vb or (isinstance(va, float) and isinstance(vb, float)
                                and math.isnan(va) and math.isnan(vb))
            if not same:
                diffs.append(f"round {a.get('round')} {key}: {va!r} vs {vb!r}")
    return diffs


def tensor_differences(old: Path, new: Path) -> tuple[int, list[str]]:
    """(tensors compared, differences) over every .safetensors file under the two folders."""
    from safetensors.torch import load_file

    files = sorted(p.relative_to(old) for p in old.rglob("*.safetensors"))
    mine = sorted(p.relative_to(new) for p in new.rglob("*.safetensors"))
    if files != mine:
        return 0, [f"files differ: {sorted(set(files) ^ set(mine))[:5]}"]
    count, diffs = 0, []
    for rel in files:
        a, b = load_file(str(old / rel)), load_file(str(new / rel))
        if a.keys() != b.keys():
            diffs.append(f"{rel}: keys differ")
            continue
        for key in a:
            count += 1
            if a[key].dtype != b[key].dtype or not bool((a[key] == b[key]).all()):
                diffs.append(f"{rel} {key}: max |diff| "
                             f"{(a[key].double() - b[key].double()).abs().max().item():.3g}")
    return count, diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the commit to compare the work tree with")
    p.add_argument("--only", nargs="*", default=sorted(SCENARIOS), choices=sorted(SCENARIOS),
                   metavar="NAME", help="scenarios to run (default: all)")
    p.add_argument("--keep", type=Path, help="keep both runs' outputs under this folder")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedlora-equiv-")) if args.keep is None else args.keep
    ref_tree = work / "ref-tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(ref_tree), args.ref], cwd=ROOT,
                   check=True, capture_output=True)
    failed = 0
    try:
        for name in args.only:
            old, new = work / "ref" / name, work / "new" / name
            run_one(ref_tree, name, old)
            run_one(ROOT, name, new)
            count, diffs = tensor_differences(old, new)
            diffs = metric_differences(old, new) + diffs
            failed += bool(diffs)
            status = "equal" if not diffs else f"DIFFERENT ({len(diffs)})"
            print(f"{name:26s} {status:16s} {count} tensors bitwise, metrics.jsonl numbers")
            for line in diffs[:8]:
                print(f"    {line}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(ref_tree)], cwd=ROOT,
                       capture_output=True)
    print(f"{len(args.only) - failed} of {len(args.only)} scenarios equal to {args.ref}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
