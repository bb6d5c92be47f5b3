"""Helpers shared by the benchmark scripts: arguments, timing, memory, data, tables.

The benchmarks are run as scripts (`python benchmarks/<name>.py`), so this module is imported
as `common` from the scripts' own folder; it is not part of the fedlora package.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

MIB = 2**20


# ---------------------------------------------------------------- command line


def parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the options every benchmark has (--model)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="base model: a fedlora built-in (smollm2-135m, tiny-llama for a quick "
                        "check), a local model folder or a .gguf file")
    return p


def quiet_libraries() -> None:
    """Hide the warnings torch/transformers/peft print on every load; results stay visible."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


# ---------------------------------------------------------------- timing


@contextmanager
def stopwatch() -> Iterator[dict]:
    """`with stopwatch() as t: ...` then `t["seconds"]` holds the wall-clock time."""
    out = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# ---------------------------------------------------------------- memory


def proc_status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmHWM, VmRSS, RssAnon, ...), or None if absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (VmHWM; getrusage where there is no /proc).

    Note: it counts every resident page, file-backed ones included, so the pages of a
    memory-mapped checkpoint count while they are mapped and touched.
    """
    kib = proc_status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = rss // 1024 if platform.system() == "Darwin" else rss
    return kib / 1024


def rss_mib(field: str = "VmRSS") -> float:
    """Current resident memory in MiB: VmRSS (all), RssAnon (heap) or RssFile (mapped files)."""
    kib = proc_status_kib(field)
    return float("nan") if kib is None else kib / 1024


# ---------------------------------------------------------------- machine


def machine() -> str:
    """One line describing where the numbers were taken."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = (f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}, load average {load}")


# ---------------------------------------------------------------- data


def packed_examples(tokenizer, count: int, length: int, seed: int = 0) -> list[dict]:
    """`count` training examples of exactly `length` tokens, with no padding.

    Records of the built-in arithmetic task are tokenized as a client does (chat template,
    prompt tokens masked out of the loss) and concatenated end to end, then cut into
    `length`-token pieces. Every batch built from them has the same shape and the attention
    mask is all ones, so two training loops fed the same examples do identical work.
    """
    from fedlora.data import builtin_task, tokenize

    ids: list[int] = []
    labels: list[int] = []
    records = builtin_task("arithmetic", max(64, count * length // 16), seed)
    for record in records:
        if len(ids) >= count * length:
            break
        example = tokenize(record, tokenizer, length)
        ids += example["input_ids"]
        labels += example["labels"]
    if len(ids) < count * length:
        raise ValueError(f"not enough text for {count} examples of {length} tokens")
    return [{"input_ids": ids[i:i + length], "labels": labels[i:i + length]}
            for i in range(0, count * length, length)]


# ---------------------------------------------------------------- output


def fmt_bytes(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB with 3 significant-ish digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                title: str | None = None) -> None:
    """Print a Markdown table (readable in a terminal, pasteable into docs)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(  # first column left-aligned, numbers right-aligned
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    if title:
        print(f"\n{title}\n")
    print(line(cells[0]))
    print("|:" + "-" * (widths[0] + 1) + "|" + "".join("-" * (w + 1) + ":|" for w in widths[1:]))
    for row in cells[1:]:
        print(line(row))
    print()
