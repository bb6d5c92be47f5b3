"""The canary audit: plant secrets in one site's data, federate, and measure what each party
can read back (`fedlora audit`).

For each arm (the default settings, secure aggregation, record-level DP-SGD, both), one
federation of `sites` sites runs in this process over `simulations.inprocess` (the real
ServerApp and ClientApp; only the transport is in memory). Site 0 holds `copies` copies of each
canary among its ordinary records of the default task. The audit reads what the server
*receives* from site 0 in round 1 (the grid's reply hook), then scores every canary's
candidates under four models:

- `base`: the base model (no adapter): what anyone knew before;
- `reply`: site 0's round-1 reply loaded as an adapter: what the server holds without secure
  aggregation (with it, the server receives a masked vector that is no adapter: `null`);
- `sum`: the round-1 global adapter, the merge of every site's reply: all a server with secure
  aggregation learns of that round;
- `final`: the global adapter after the last round: what every site and whoever gets the
  adapter hold.

Plus the exact-match accuracy of the final global adapter on held-out records of the default
task (the price of each setting). Every candidate's log-likelihood is kept in results.json.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.audit.canaries import (
    Canary,
    OwnSecret,
    exposure,
    make_canaries,
    planted,
    rank_of,
)
from fedlora.audit.plan import ARMS, SITE_FIELD, VIEWS, AuditPlan

if TYPE_CHECKING:
    import torch
    from flwr.app import Message

def site_records(plan: AuditPlan, canaries: list[Canary]) -> tuple[list[dict], list[dict]]:
    """(every site's training records, labelled by `site`, canaries in site 0's; held-out
    records of the same task for accuracy, drawn with another seed)."""
    from fedlora.data import load_records

    total = plan.sites * plan.records_per_site
    records = load_records(plan.dataset, total + plan.accuracy_examples, plan.seed)
    train, held_out = records[:total], records[total:]
    sites = [[{**r, SITE_FIELD: f"site-{i}"} for r in train[i::plan.sites]]
             for i in range(plan.sites)]
    sites[0] = [{**r, SITE_FIELD: "site-0"} for r in
                planted(sites[0], canaries, plan.copies, plan.seed)]
    return [r for site in sites for r in site], held_out


def arm_config(plan: AuditPlan, arm: str, data: Path, out_dir: Path) -> dict[str, Any]:
    """The run config of one arm's federation: every record a site holds is trained on
    (eval-fraction 0), one site per `site` value, no evaluation rounds (the audit scores)."""
    return {"model": plan.model, "dataset": str(data),
            "partitioner": "by-field", "partition-field": SITE_FIELD, "eval-fraction": 0.0,
            "num-server-rounds": plan.rounds, "local-steps": plan.local_steps,
            "fraction-evaluate": 0.0, "eval-accuracy": 0, "seed": plan.seed,
            "min-available-nodes": plan.sites, "min-train-nodes": plan.sites,
            **plan.run_config, **ARMS[arm], "output-dir": str(out_dir)}


class ReplyTap:
    """A grid hook that keeps what the server receives from site 0 in round 1 (and what that
    site was sent), and passes every reply on unchanged."""

    def __init__(self, node: int) -> None:
        self.node = node
        self.sent: Message | None = None
        self.reply: Message | None = None

    def __call__(self, msg: Message, reply: Message) -> Message:
        if (msg.metadata.dst_node_id == self.node and msg.metadata.message_type == "train"
                and self.reply is None):
            self.sent, self.reply = msg, reply
        return reply


def federate(plan: AuditPlan, arm: str, data: Path, out_dir: Path) -> ReplyTap:
    """One arm's federation in process; what site 0 sent the server in round 1."""
    from simulations.inprocess import node_contexts, run_inprocess

    config = arm_config(plan, arm, data, out_dir)
    site0 = next(node for node, ctx in node_contexts(config, plan.sites).items()
                 if ctx.node_config["partition-id"] == 0)
    tap = ReplyTap(site0)
    run_inprocess(config, plan.sites, hook=tap)
    return tap


def reply_state(tap: ReplyTap, slot, rank: int) -> dict[str, torch.Tensor] | None:
    """Site 0's round-1 reply as the adapter it is (what the site was sent, overlaid with
    what it sent back), or None when what the server received is not an adapter (masked)."""
    from clients.client_app import received_state
    from fedlora import wire
    from fedlora.records import from_array_record

    if tap.reply is None or tap.sent is None or tap.reply.has_error():
        return None
    arrays = tap.reply.content.array_records.get(wire.ARRAYS)
    if arrays is None:
        return None
    state = received_state(tap.sent, slot, rank)
    sent_back = from_array_record(arrays)
    if not sent_back or any(k not in state or state[k].shape != v.shape
                            for k, v in sent_back.items()):
        return None
    state.update(sent_back)
    return state


def common_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares (at most the shortest row's length - 1, so
    each row keeps a token of its own)."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def candidate_scores(model, tokenizer, canary: Canary | OwnSecret, batch_size: int = 100
                     ) -> list[float]:
    """log P(answer with each candidate secret | the canary's question), every candidate:
    what `fedlora.train.choices.choice_logliks` computes (prompt and answer tokenized apart,
    the answer's tokens summed), with the prompt and the answers' shared start run once and
    kept in the model's cache, so each candidate costs only its last few tokens."""
    import copy

    import torch

    from fedlora.train.accuracy import question_prompt
    from fedlora.train.choices import pad_id, token_ids

    prompt = token_ids(tokenizer, question_prompt(canary.record(), tokenizer))
    answers = [token_ids(tokenizer, text) for text in canary.answers()]
    common = common_prefix(answers)
    prefix = prompt + answers[0][:common]
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
            logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
            shared = sum(float(logprobs[len(prompt) - 1 + i, answers[0][i]]) for i in range(common))
            first = logprobs[-1]  # predicts each candidate's first own token
            scores: list[float] = []
            for start in range(0, len(answers), batch_size):
                rows = [a[common:] for a in answers[start:start + batch_size]]
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
                mask = torch.zeros((len(rows), len(prefix) + width), dtype=torch.long)
                mask[:, :len(prefix)] = 1
                for r, row in enumerate(rows):
                    ids[r, :len(row)] = torch.tensor(row)
                    mask[r, len(prefix):len(prefix) + len(row)] = 1
                cache = copy.deepcopy(out.past_key_values)
                cache.batch_repeat_interleave(len(rows))
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               past_key_values=cache, use_cache=True).logits
                step = torch.log_softmax(logits.float(), dim=-1)  # position t predicts t + 1
                for r, row in enumerate(rows):
                    scores.append(shared + float(first[row[0]]) + sum(
                        float(step[r, t - 1, row[t]]) for t in range(1, len(row))))
            return scores
    finally:
        model.train(training)


def score_view(model, tokenizer, canaries: list[Canary] | list[OwnSecret]) -> list[dict]:
    """Each canary's exposure, rank and every candidate's score under `model` as it is."""
    out = []
    for canary in canaries:
        scores = candidate_scores(model, tokenizer, canary)
        out.append({"canary": canary.person, "exposure": exposure(scores, canary.true_index()),
                    "rank": rank_of(scores, canary.true_index()), "candidates": len(scores),
                    "scores": scores})
    return out


def audit_arm(plan: AuditPlan, arm: str, data: Path, held_out: list[dict],
              canaries: list[Canary], out_dir: Path, progress=print) -> dict[str, Any]:
    """Federate one arm and score every view of it (a progress line per view: scoring takes
    minutes on a CPU). With one round the final adapter is the round-1 sum, scored once."""
    from clients.client_app import WORKSPACE, node_settings
    from fedlora.train.accuracy import exact_match
    from simulations.inprocess import node_contexts

    started = time.perf_counter()
    tap = federate(plan, arm, data, out_dir)
    seconds = time.perf_counter() - started
    # the settings a site trains with: the same base model and adapter, loaded once
    context = next(iter(node_contexts(arm_config(plan, arm, data, out_dir), 1).values()))
    settings, _ = node_settings(context)
    slot = WORKSPACE.get(settings.model, settings.lora, settings.train)
    model, tokenizer = slot.model, slot.tokenizer
    views: dict[str, Any] = {}
    candidates = len(canaries[0].answers()) if canaries else 0
    progress(f"fedlora audit: arm {arm}: federation done in {seconds:.0f} s; scoring "
             f"{len(canaries)} canary(ies) x {candidates} candidates under each of "
             f"{', '.join(VIEWS)}")

    def scored(view: str) -> list[dict]:
        started = time.perf_counter()
        result = score_view(model, tokenizer, canaries)
        mean = sum(r["exposure"] for r in result) / max(len(result), 1)
        progress(f"fedlora audit: arm {arm}: {view}: {mean:.2f} bits "
                 f"({time.perf_counter() - started:.0f} s)")
        return result

    with model.disable_adapter():
        views["base"] = scored("base")
    from safetensors.torch import load_file

    states = {"reply": reply_state(tap, slot, settings.lora.rank),
              "sum": load_file(str(out_dir / "rounds" / "1" / "adapter_model.safetensors")),
              "final": load_file(str(out_dir / "final" / "adapter_model.safetensors"))}
    accuracy = None
    for view, state in states.items():
        if state is None:
            views[view] = None
            continue
        slot.peft.set_state(model, slot.adapter, state)
        if view == "final" and same_state(state, states["sum"]):
            views[view] = views["sum"]  # one round: the final adapter is the round-1 sum
        else:
            views[view] = scored(view)
        if view == "final" and held_out:
            counts, _ = exact_match(model, tokenizer, held_out, plan.dataset,
                                    settings.train.max_new_tokens)
            accuracy = counts.overall
    return {"arm": arm, "settings": ARMS[arm], "views": views, "accuracy": accuracy,
            "federation-seconds": seconds,
            "reply-received": describe_reply(tap)}


def same_state(a: dict, b: dict | None) -> bool:
    """Whether two adapter states hold the same tensors, bit for bit (None: no state)."""
    import torch

    return b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def describe_reply(tap: ReplyTap) -> str:
    """What the server received from site 0 in round 1, in words."""
    if tap.reply is None:
        return "nothing"
    if tap.reply.has_error():
        return f"an error reply ({tap.reply.error.reason})"
    arrays = tap.reply.content.array_records
    return "; ".join(f"{name}: {len(record)} arrays" for name, record in arrays.items()) or \
        "no arrays"


def summary_rows(results: list[dict]) -> list[dict]:
    """One row per arm: mean exposure over the canaries under each view, and accuracy."""
    rows = []
    for arm in results:
        row: dict[str, Any] = {"arm": arm["arm"], "accuracy": arm["accuracy"]}
        for view in VIEWS:
            scored = arm["views"].get(view)
            row[view] = (None if scored is None else
                         sum(c["exposure"] for c in scored) / len(scored))
            row[f"{view}-rank"] = None if scored is None else [c["rank"] for c in scored]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The summary as a Markdown table (exposure in bits; rank of each canary)."""
    def cell(row: dict, view: str) -> str:
        if row[view] is None:
            return "masked" if view == "reply" else "n/a"
        ranks = ",".join(str(r) for r in row[f"{view}-rank"])
        return f"{row[view]:.2f} (rank {ranks})"

    lines = ["| arm | " + " | ".join(VIEWS) + " | accuracy |",
             "|---|" + "---:|" * (len(VIEWS) + 1)]
    for row in rows:
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        lines.append(f"| {row['arm']} | " + " | ".join(cell(row, v) for v in VIEWS)
                     + f" | {acc} |")
    return "\n".join(lines)


def check_arms(plan: AuditPlan, out_dir: Path) -> None:
    """Every arm's settings load (before any federation starts), or the arm's reason."""
    from fedlora.config import SettingsError
    from fedlora.methods import load

    for arm in plan.arms:
        try:
            load(arm_config(plan, arm, out_dir / "audit-data.jsonl", out_dir / arm), {})
        except SettingsError as err:
            raise SettingsError(f"audit arm {arm!r}: {err}") from err


def write_report(plan: AuditPlan, canaries: list[Canary], results: list[dict],
                 out_dir: Path) -> dict[str, Any]:
    """<out_dir>/results.json (every score) and summary.md (the table) of the arms so far."""
    rows = summary_rows(results)
    report = {"plan": asdict(plan), "canaries": [asdict(c) for c in canaries],
              "candidates": 10 ** plan.digits, "summary": rows, "arms": results}
    (out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "summary.md").write_text(table(rows) + "\n")
    return report


def run_audit(plan: AuditPlan, out_dir: Path, progress=print) -> dict[str, Any]:
    """Every arm of `plan`; writes <out_dir>/results.json and returns it."""
    plan.check()
    check_arms(plan, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    canaries = make_canaries(plan.canaries, plan.digits, plan.seed)
    records, held_out = site_records(plan, canaries)
    random.Random(plan.seed).shuffle(records)
    data = out_dir / "audit-data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    results: list[dict] = []
    report: dict[str, Any] = {}
    for arm in plan.arms:
        progress(f"fedlora audit: arm {arm}: {plan.sites} sites, {plan.rounds} round(s) of "
                 f"{plan.local_steps} steps; {plan.canaries} canary(ies) x {plan.copies} "
                 f"copies in site 0's data")
        arm_dir = out_dir / arm
        shutil.rmtree(arm_dir, ignore_errors=True)
        results.append(audit_arm(plan, arm, data, held_out, canaries, arm_dir, progress))
        row = summary_rows(results[-1:])[0]
        accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        progress(f"fedlora audit: arm {arm}: exposure " + ", ".join(
            f"{v} {'masked' if row[v] is None else f'{row[v]:.2f} bits'}" for v in VIEWS)
            + f"; accuracy {accuracy}")
        # after every arm: a long audit stopped part way keeps what it measured
        report = write_report(plan, canaries, results, out_dir)
    return report


if __name__ == "__main__":  # pragma: no cover - `fedlora audit` is the entry point
    sys.exit("run `fedlora audit --help`")
