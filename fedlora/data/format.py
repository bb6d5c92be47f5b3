"""Turn records into token ids with labels on the response tokens only, pack and batch them.

Instruction and chat records use the tokenizer's chat template when it has one, a plain
`### Instruction` template otherwise; a multi-turn conversation trains on every assistant turn
(`train-on=all-assistant`, as TRL) or on its last one (`last-assistant`), and an assistant turn
with `"weight": 0` (as in OpenAI's format) is context either way. Text prompt/completion pairs
are joined as they are, with no template (as in TRL), and end with the EOS token. A text record
(`{"text": ...}`, continued pre-training) is learned whole: every token is a target.

A record becomes segments, pieces of text that are trained or not, tokenized one by one so
that labels follow them. Packed sequences carry `position_ids` that restart at every example,
so that (`fedlora.train.loss`) a token attends only to its own example.
"""

from __future__ import annotations

import torch

from fedlora.config import TRAIN_ON

IGNORE = -100  # label value that the loss skips
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def as_text(value: object, field: str, where: str) -> str:
    """A text field's value (numbers become text; None, lists and objects are refused)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field {field!r} must be text, got {value!r}")


def to_messages(record: dict) -> list[dict]:
    """A record as chat messages; the last one is the assistant's answer."""
    if "messages" in record:  # "weight" (0: context, not a target) kept where a turn has it
        return [{k: m[k] for k in ("role", "content", "weight") if k in m}
                for m in record["messages"]]
    if "prompt" in record:
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]}]
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def prompt_and_response(messages: list[dict], tokenizer) -> tuple[str, str]:
    """Split a conversation into the text before the answer and the answer text itself."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not extend the prompt with the "
                             "answer; cannot mask the prompt out of the loss")
        return prompt, full[len(prompt):]
    history = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages[:-2])
    user = messages[-2]["content"] if len(messages) > 1 else ""
    prompt = history + PLAIN_PROMPT.format(instruction=user, input_block="")
    return prompt, messages[-1]["content"] + (tokenizer.eos_token or "")


def is_raw(record: dict) -> bool:
    """Is this a raw prompt/completion pair (joined as it is, no chat template)?"""
    return "prompt" in record and "messages" not in record


def is_text(record: dict) -> bool:
    """Is this a text record (continued pre-training: every token a target, no answer)?"""
    return "text" in record and not any(k in record for k in ANSWER_FORMS)


ANSWER_FORMS = ("messages", "prompt", "completion", "instruction", "output")  # not text records
Segments = list[tuple[str, bool]]  # (text, trained?) pieces of one example, in order


def trained_turns(messages: list[dict], train_on: str) -> list[int]:
    """Indices of the assistant turns that are targets: all of them, or the last one
    (`train_on`), less those with weight 0."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"setting 'train-on': expected one of {', '.join(TRAIN_ON)}, got "
                         f"{train_on!r}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last-assistant":
        turns = turns[-1:]
    return [i for i in turns if messages[i].get("weight", 1) != 0]


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """The chat template's text of `messages`."""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def template_segments(messages: list[dict], tokenizer, turns: list[int]) -> Segments:
    """The templated conversation cut at each trained assistant turn: turn i's text is what
    rendering messages[:i + 1] adds to messages[:i] with the generation prompt (its
    end-of-turn token as the template writes it included)."""
    full = render(tokenizer, messages)
    segments: Segments = []
    done = 0
    for i in turns:
        before = render(tokenizer, messages[:i], True) if i else ""
        after = render(tokenizer, messages[:i + 1])
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as the "
                f"rendering of its first turns plus the rest (at assistant turn {i}), so the "
                "loss cannot be limited to the assistant turns; set train-on=last-assistant")
        if len(before) > done:
            segments.append((full[done:len(before)], False))
        segments.append((full[len(before):len(after)], True))
        done = len(after)
    if done < len(full):
        segments.append((full[done:], False))
    return segments


def plain_segments(messages: list[dict], tokenizer, turns: list[int]) -> Segments:
    """The plain template: earlier turns as `role: content` paragraphs, the last user turn
    in the `### Instruction` block and the answer after `### Response:` with the EOS token."""
    segments: Segments = []
    for i, m in enumerate(messages[:-2]):
        if i in turns:
            segments += [(f"{m['role']}: ", False), (m["content"], True), ("\n\n", False)]
        else:
            segments.append((f"{m['role']}: {m['content']}\n\n", False))
    user = messages[-2]["content"] if len(messages) > 1 else ""
    segments.append((PLAIN_PROMPT.format(instruction=user, input_block=""), False))
    last = len(messages) - 1
    segments.append((messages[-1]["content"] + (tokenizer.eos_token or ""), last in turns))
    return segments


def record_segments(record: dict, tokenizer, train_on: str = "all-assistant") -> Segments:
    """A record's text as (text, trained?) pieces: a text record whole; a raw prompt and its
    completion; a conversation (Alpaca: one turn) templated, its trained assistant turns
    (`train_on`) apart."""
    eos = tokenizer.eos_token or ""
    if is_text(record):
        return [(record["text"] + eos, True)]
    if is_raw(record):
        return [(record["prompt"], False), (record["completion"] + eos, True)]
    messages = to_messages(record)
    turns = trained_turns(messages, train_on)
    if getattr(tokenizer, "chat_template", None):
        if turns == [len(messages) - 1]:  # the answer alone: the prompt and the rest
            prompt, response = prompt_and_response(messages, tokenizer)
            return [(prompt, False), (response, True)]
        return template_segments(messages, tokenizer, turns)
    return plain_segments(messages, tokenizer, turns)


def fit(prompt_ids: list[int], response_ids: list[int], max_length: int, truncation: str
        ) -> list[int]:
    """The prompt tokens kept so that prompt + answer fit in max_length: with "left", the
    prompt's start is cut first, keeping at least half of max_length of it (the rest of the
    example is then cut from the right); with "right", the prompt is kept whole."""
    if truncation == "right" or len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids
    keep = max(max_length - len(response_ids), min(len(prompt_ids), max_length // 2))
    return prompt_ids[len(prompt_ids) - keep:]


def has_generation_marks(tokenizer) -> bool:
    """Does the chat template mark assistant text with {% generation %} (so that transformers
    can give the assistant tokens' mask)?"""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "generation" in template and "endgeneration" in template


def masked_tokens(messages: list[dict], tokenizer, turns: list[int]
                  ) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) from the chat template's assistant mask: its k-th run of marked
    tokens is the k-th assistant turn, labelled when it is one of `turns`; None when the
    runs and the assistant turns do not pair up."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    runs = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(runs) != len(assistant):
        return None
    labels = [IGNORE] * len(ids)
    for start, turn in zip(runs, assistant):
        end = start
        while end < len(ids) and mask[end]:
            end += 1
        if turn in turns:
            labels[start:end] = ids[start:end]
    return ids, labels


def segment_tokens(record: dict, tokenizer, train_on: str = "all-assistant"
                   ) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole record: the chat template's assistant mask where it
    has one (`masked_tokens`), else each segment tokenized on its own, labels -100 on the
    segments that are not trained."""
    if not is_text(record) and not is_raw(record) and has_generation_marks(tokenizer):
        messages = to_messages(record)
        found = masked_tokens(messages, tokenizer, trained_turns(messages, train_on))
        if found is not None:
            return found
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in record_segments(record, tokenizer, train_on):
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def tokenize(record: dict, tokenizer, max_length: int, truncation: str = "left",
             train_on: str = "all-assistant") -> dict[str, list[int]]:
    """input_ids and labels (prompt tokens masked with -100), at most max_length long: the
    prompt's start is cut first ("left", so that the answer stays), or the end ("right").
    The answer is the last trained segment and what follows it; earlier trained turns of a
    conversation count as prompt here (cut first). A text record keeps its first max_length
    tokens (`tokenize_records` keeps all of them, in pieces)."""
    ids, labels = segment_tokens(record, tokenizer, train_on)
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    start = 0
    if trained and not is_text(record):  # where the last trained segment starts
        start = trained[-1]
        while start > 0 and labels[start - 1] != IGNORE:
            start -= 1
    kept = fit(ids[:start], ids[start:], max_length, truncation)
    cut = start - len(kept)
    return {"input_ids": ids[cut:][:max_length], "labels": labels[cut:][:max_length]}


def text_pieces(record: dict, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """A text record as max_length pieces, every token a target (nothing is cut away)."""
    ids, labels = segment_tokens(record, tokenizer)
    return [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
            for i in range(0, len(ids), max_length)]


def answer_tokens(example: dict[str, list[int]]) -> int:
    """Tokens the loss learns from: labels that are not IGNORE, after the first position
    (the model shifts labels, so the first one is never predicted)."""
    return sum(label != IGNORE for label in example["labels"][1:])


LOST_WARNING = 0.1  # warn when more than this share of examples lost their whole answer


def check_answers(examples: list[dict[str, list[int]]], who: str, max_length: int,
                  truncation: str) -> str | None:
    """Raise a ValueError when no training example keeps an answer token (training would
    learn nothing); a warning when more than 10 % of them lost their whole answer; else None."""
    lost = sum(answer_tokens(e) == 0 for e in examples)
    if examples and lost == len(examples):
        raise ValueError(
            f"{who}: every one of its {len(examples)} training examples loses its whole answer "
            f"at max-length={max_length} (truncation={truncation}), so training would learn "
            f"nothing; raise max-length" + (" or set truncation=left" if truncation == "right"
                                            else ""))
    if lost > LOST_WARNING * len(examples):
        return (f"{who}: {lost} of {len(examples)} training examples lose their whole answer "
                f"at max-length={max_length} (truncation={truncation}) and teach nothing; "
                f"raise max-length")
    return None


def pack(examples: list[dict[str, list[int]]], max_length: int,
         eos_id: int) -> list[dict[str, list[int]]]:
    """Examples joined end to end (an EOS between them) and cut into max_length sequences.

    The separating EOS is not a target (an example's own end token already is), so a truncated
    example does not learn to stop; nor is an example's first token (no token of its own
    precedes it). `position_ids` count from 0 at every example's start (and at a sequence's
    start), so that the model keeps the examples apart; a sequence with nothing to predict is
    dropped.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        size = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE, *e["labels"][1:]] if size else []
        if not e["input_ids"] or e["input_ids"][-1] != eos_id:
            ids.append(eos_id)
            labels.append(IGNORE)
        positions += range(len(ids) - len(positions))
    chunks = [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length],
               "position_ids": restarted(positions[i:i + max_length])}
              for i in range(0, len(ids), max_length)]
    # the model shifts labels, so a sequence's first label is never predicted
    return [c for c in chunks if answer_tokens(c)]


def restarted(positions: list[int]) -> list[int]:
    """Positions of a sequence cut out of a packed stream: its first example (which may have
    started in the sequence before) counts from 0."""
    if not positions or positions[0] == 0:
        return positions
    offset = positions[0]
    end = next((i for i, p in enumerate(positions) if p == 0), len(positions))
    return [p - offset for p in positions[:end]] + positions[end:]


def tokenize_records(records: list[dict], tokenizer, max_length: int,
                     packing: bool = False, truncation: str = "left",
                     train_on: str = "all-assistant") -> list[dict[str, list[int]]]:
    """Every record tokenized (cut to max_length; a text record in max_length pieces), then
    packed into max_length sequences."""
    examples = []
    for r in records:
        if is_text(r):
            examples += text_pieces(r, tokenizer, max_length)
        else:
            examples.append(tokenize(r, tokenizer, max_length, truncation, train_on))
    return pack_with(tokenizer, examples, max_length) if packing else examples


def pack_with(tokenizer, examples: list[dict[str, list[int]]], max_length: int
              ) -> list[dict[str, list[int]]]:
    """`pack` with the tokenizer's EOS between examples (refused when it has none)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("setting 'packing': packing puts an EOS token between examples, but "
                         "the tokenizer has none; set packing=false")
    return pack(examples, max_length, tokenizer.eos_token_id)


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into (batch, longest) tensors; packed ones
    (with `position_ids`) also get `position_ids`, the padding counting from 0 as an example
    of its own."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any("position_ids" in e for e in examples)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(e.get("position_ids", range(n)))
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return {**batch, "position_ids": positions} if packed else batch


def unpacked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch with each of its examples in a row of its own (right-padded, the
    padding id taken from a padding position, else 0), for a model that cannot be given
    position resets; the labelled tokens are the same."""
    rows = []
    pad = 0
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        if n < batch["input_ids"].shape[1]:
            pad = int(batch["input_ids"][row, n])
        starts = [i for i in range(n) if int(batch["position_ids"][row, i]) == 0] + [n]
        rows += [{"input_ids": batch["input_ids"][row, a:b].tolist(),
                  "labels": batch["labels"][row, a:b].tolist()}
                 for a, b in zip(starts, starts[1:])]
    return collate(rows, pad)
