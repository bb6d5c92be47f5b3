"""Server-side evaluation (server-eval > 0): the global adapter scored after every round on a
held-out set the clients never train on, with one base model loaded in the ServerApp.

The held-out set is `server-eval-data` when given, else the union of the simulated clients'
held-out splits of `dataset` (shuffled with the seed, so every task family is represented);
`server-eval` examples of it give the eval loss, and those that name their scorer (all of them
with exact-match=all) exact-match accuracy per family. With objective=dpo the held-out records
are preference pairs: the eval loss is of the chosen responses, and the preference figures of
the global adapter against the base model (`fedlora.train.preference.evaluate_pairs`, as the
nodes report them) are `server-pref-accuracy`, `server-pref-margin`, `server-chosen-logp`,
`server-rejected-logp` over `server-pref-pairs`.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from fedlora.adapters import Workspace, set_residual
from fedlora.config import Settings
from fedlora.data import client_records, load_source
from fedlora.data.preference import for_objective, tokenize_for
from fedlora.train import evaluate
from fedlora.train.accuracy import exact_match, generation_batch, scored_records
from fedlora.train.choices import multiple_choice
from fedlora.train.preference import evaluate_pairs, figures_metrics
from fedlora.wire import M


def held_out_records(settings: Settings, num_partitions: int) -> list[dict]:
    """`server-eval` records of the server's held-out set."""
    data, fed = settings.data, settings.federation
    if settings.train.server_eval_data:
        records = load_source(settings.train.server_eval_data, data.field_mapping(),
                              data.data_split, data.roles_mapping())
    elif data.data_path:
        raise ValueError("setting 'server-eval': the nodes read their own data-path, so the "
                         "server has no held-out split of theirs; set server-eval-data to a "
                         "held-out file the server can read")
    else:
        records = [r for pid in range(num_partitions)
                   for r in client_records(data, pid, num_partitions, fed.seed)[1]]
        random.Random(fed.seed).shuffle(records)
    if not records:
        raise ValueError("setting 'server-eval': the server's held-out set is empty")
    source = settings.train.server_eval_data or data.dataset
    return for_objective(records, settings.train.objective, fed.seed,
                         source)[: settings.train.server_eval]


class ServerEvaluator:
    """Scores an exported global adapter (PEFT scale, any rank) on the held-out records."""

    def __init__(self, settings: Settings, num_partitions: int) -> None:
        self.settings = settings
        self.records = held_out_records(settings, num_partitions)
        self.workspace = Workspace()
        self.examples: list[dict] | None = None  # tokenized once, with the first slot's tokenizer

    def __call__(self, state: dict, rank: int) -> dict:
        """{"server-eval-loss", "server-accuracy", "server-accuracy/<family>"} of `state`."""
        if not state:
            return {}
        s = self.settings
        lora = replace(s.lora, rank=rank) if rank else s.lora  # rank 0: a method without factors
        slot = self.workspace.get(s.model, lora, s.train)
        set_residual(slot, lora, None)  # export() already folds the residual into `state`
        slot.peft.set_state(slot.model, slot.adapter, {k: v.float() for k, v in state.items()})
        if self.examples is None:
            self.examples = tokenize_for(self.records, slot.tokenizer, s.train.objective,
                                         s.train.max_length, s.train.truncation,
                                         s.data.train_on)
        loss = evaluate(slot.model, self.examples, slot.tokenizer.pad_token_id,
                        batch_size=s.train.batch_size, desc="server-eval")
        if s.train.objective == "dpo":  # pairs: the preference figures against the base
            figures = evaluate_pairs(slot.model, self.examples, slot.tokenizer.pad_token_id,
                                     s.train.dpo_beta, s.train.batch_size)
            return {"server-eval-loss": loss.loss, "server-eval-examples": len(self.records),
                    **{f"server-{k}": v
                       for k, v in figures_metrics(figures, len(self.examples)).items()}}
        scored = scored_records(self.records, s.data.dataset, s.train.exact_match,
                                len(self.records))
        accuracy, _ = exact_match(slot.model, slot.tokenizer, scored, s.data.dataset,
                                  s.train.max_new_tokens, generation_batch(s), "server-eval")
        choice = multiple_choice(slot.model, slot.tokenizer, self.records, generation_batch(s))
        out: dict[str, Any] = {"server-eval-loss": loss.loss,
                               "server-eval-examples": len(self.records)}
        out.update({f"server-{k}": v for k, v in accuracy.metrics().items()})
        if accuracy.samples:
            out[M.SERVER_SAMPLES] = accuracy.samples
        if choice.total:  # multiple-choice records: server-choice-accuracy
            out.update({f"server-{k}": v for k, v in choice.metrics().items()})
        return out
