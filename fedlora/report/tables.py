"""Text tables: the per-round table `fedlora simulate` prints, the per-run Markdown summary."""

from __future__ import annotations

from fedlora.report.runs import ACCURACY, Run, finite, last
from fedlora.wire import M

MB = 1e6


def fmt(value, spec: str = ".3f") -> str:
    """A number in `spec`, or n/a when it is missing or not finite."""
    value = finite(value)
    return "n/a" if value is None else format(value, spec)


def round_table(rows: list[dict]) -> str:
    """One line per round; the accuracy column appears when any round reports accuracy, the
    eval perplexity when none does; then every evaluation failure (`evaluation_failures`)."""
    columns = [("round", 5, lambda r: str(r[M.ROUND])),
               ("train-loss", 10, lambda r: fmt(r.get(M.TRAIN_LOSS))),
               ("eval-loss", 9, lambda r: fmt(r.get(M.EVAL_LOSS)))]
    if any(ACCURACY in r for r in rows):
        columns.append(("accuracy", 8, lambda r: fmt(r.get(ACCURACY))))
    else:
        columns.append(("perplexity", 10, lambda r: fmt(r.get(M.EVAL_PERPLEXITY), ".2f")))
    columns += [("exactness", 9, lambda r: fmt(r.get(M.EXACTNESS))),
                ("replied", 7, lambda r: str(r.get(M.CLIENTS_REPLIED, 0))),
                ("failed", 6, lambda r: str(r.get(M.CLIENTS_FAILED, 0))),
                ("eval-failed", 11, lambda r: str(len(r.get(M.EVAL_FAILURES) or []))),
                ("MB up", 6, lambda r: fmt((r.get(M.BYTES_UP) or 0) / MB, ".2f")),
                ("MB down", 7, lambda r: fmt((r.get(M.BYTES_DOWN) or 0) / MB, ".2f")),
                ("seconds", 7, lambda r: fmt(r.get(M.SECONDS) or 0, ".1f"))]
    lines = ["  ".join(f"{name:>{width}}" for name, width, _ in columns)]
    for r in rows:
        lines.append("  ".join(f"{cell(r):>{width}}" for _, width, cell in columns))
    failures = evaluation_failures(rows)
    return "\n".join(lines + (["", failures] if failures else []))


def evaluation_failures(rows: list[dict]) -> str:
    """'evaluation failures:' and one line per failure (round, node, reason), or ''."""
    lines = [f"  round {r[M.ROUND]}: {_who(f)}: {f.get('reason')}"
             for r in rows for f in r.get(M.EVAL_FAILURES) or []]
    return "\n".join(["evaluation failures (the run is degraded):", *lines]) if lines else ""


def _who(failure: dict) -> str:
    """'the server (server-eval)', 'node 12 (site-a)' or 'node 12'."""
    name = failure.get(M.NODE_NAME)
    if name == "server" and failure.get(M.NODE_ID) == 0:
        return "the server (server-eval)"
    return f"node {failure.get(M.NODE_ID)}" + (f" ({name})" if name else "")


def base_row(rows: list[dict]) -> dict:
    """The metrics of round 0 (the global model before training), or {} when not evaluated."""
    return next((r for r in rows if r.get(M.ROUND) == 0), {})


def before_after(rows: list[dict]) -> str:
    """Round 0 (the base model) against the last round: accuracy (overall, per family, per
    client), eval loss and perplexity; '' when the run has no round 0 or no later evaluation."""
    before = base_row(rows)
    evaluated = [r for r in rows
                 if r.get(M.ROUND, 0) > 0 and finite(r.get(M.EVAL_LOSS)) is not None]
    if not before or not evaluated:
        return ""
    after = evaluated[-1]
    keys = [ACCURACY] if ACCURACY in before or ACCURACY in after else []
    families = sorted(k for k in before.keys() | after.keys() if k.startswith(ACCURACY + "/"))
    keys += families if len(families) > 1 else []
    keys += [M.EVAL_LOSS]
    keys += [M.EVAL_PERPLEXITY] * (M.EVAL_PERPLEXITY in before or M.EVAL_PERPLEXITY in after)
    # objective=dpo: the held-out preference figures against the base model
    keys += [k for k in (M.PREF_ACCURACY, M.PREF_MARGIN, M.CHOSEN_LOGP, M.REJECTED_LOGP)
             if k in before or k in after]
    federated = f"federated (round {after[M.ROUND]})"
    lines = [f"{'':22}  {'base (round 0)':>14}  {federated:>20}  {'change':>8}"]

    def row(label: str, old, new) -> None:
        change = "n/a" if finite(old) is None or finite(new) is None else f"{new - old:+.3f}"
        lines.append(f"{label:22}  {fmt(old):>14}  {fmt(new):>20}  {change:>8}")

    for key in keys:
        row(key, before.get(key), after.get(key))
    old_clients = before.get(M.CLIENT_ACCURACY) or {}
    new_clients = after.get(M.CLIENT_ACCURACY) or {}
    for client in sorted(old_clients.keys() | new_clients.keys(), key=_client_order):
        row(f"accuracy of client {client}", old_clients.get(client), new_clients.get(client))
    return "\n".join(lines)


def sample_answers(rows: list[dict]) -> str:
    """A few held-out questions with the base model's answer (round 0) and the federated
    adapter's (the last round that kept answers): the clients' samples, else server-eval's;
    '' when round 0 or a later round kept none. Questions are matched by client and text."""
    before = base_row(rows)
    for key, where in ((M.SAMPLES, "client"), (M.SERVER_SAMPLES, "server-eval")):
        later = [r for r in rows if r.get(M.ROUND, 0) > 0 and r.get(key)]
        if not before.get(key) or not later:
            continue
        after = later[-1]
        answered = {(s.get(M.PARTITION_ID), s["question"]): s for s in after[key]}
        lines = [f"sample answers ({where} held-out questions): base = round 0, federated = "
                 f"round {after[M.ROUND]}"]
        for old in before[key]:
            new = answered.get((old.get(M.PARTITION_ID), old["question"]))
            if new is None:
                continue
            origin = (f", client {old[M.PARTITION_ID]}" if old.get(M.PARTITION_ID) is not None
                      else "")
            lines += ["", f"[{old['family']}{origin}] {_one_line(old['question'])}",
                      f"  expected:   {_one_line(old['expected'])}",
                      f"  base:       {_one_line(old['answer'])}  ({_verdict(old)})",
                      f"  federated:  {_one_line(new['answer'])}  ({_verdict(new)})"]
        if len(lines) > 1:
            return "\n".join(lines)
    return ""


def _one_line(text: str, width: int = 160) -> str:
    """`text` on one line, cut to `width` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def _verdict(sample: dict) -> str:
    return "right" if sample.get("correct") else "wrong"


def _client_order(client: str) -> tuple[int, str]:
    """Partition ids in numeric order."""
    return (int(client), "") if client.lstrip("-").isdigit() else (1 << 30, client)


def total_megabytes(run: Run) -> float:
    """Bytes sent both ways over the whole run, in MB (bytes-total when the run logs it)."""
    logged = last(run.rows, M.BYTES_TOTAL)
    if logged is not None:
        return logged / MB
    keys = (M.BYTES_UP, M.BYTES_DOWN, M.BYTES_DOWN_EVAL)
    return sum(finite(r.get(k)) or 0.0 for r in run.rows for k in keys) / MB


def summary_markdown(runs: list[Run]) -> str:
    """A Markdown table, one row per run; accuracy only when some run reports it."""
    with_accuracy = any(last(run.rows, ACCURACY) is not None for run in runs)
    with_base = any(finite(base_row(run.rows).get(ACCURACY)) is not None for run in runs)
    header = ["run", "strategy", "rounds", "final train-loss", "final eval-loss"]
    header += ["base accuracy (round 0)"] * with_base
    header += ["final accuracy"] * with_accuracy + ["MB total", M.SECONDS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [f"`{run.name or run.path.name}`", run.strategy, str(run.rows[-1][M.ROUND]),
                 fmt(last(run.rows, M.TRAIN_LOSS), ".4f"), fmt(last(run.rows, M.EVAL_LOSS), ".4f")]
        cells += [fmt(base_row(run.rows).get(ACCURACY), ".4f")] * with_base
        cells += [fmt(last(run.rows, ACCURACY), ".4f")] * with_accuracy
        seconds = sum(finite(r.get(M.SECONDS)) or 0.0 for r in run.rows)
        cells += [f"{total_megabytes(run):.2f}", f"{seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
