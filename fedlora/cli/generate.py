"""`fedlora generate`: answer a prompt (or chat) with a base model plus a fedlora adapter."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from fedlora.cli.export import base_model_name, check_adapter


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora generate`."""
    p.add_argument("--adapter", type=Path,
                   help="a PEFT adapter folder written by fedlora (e.g. fedlora-output/final)")
    p.add_argument("--prompt", help="the user message to answer (printed reply goes to stdout)")
    p.add_argument("--chat", action="store_true",
                   help="interactive: read user messages from stdin, one per line, keeping the "
                        "conversation; an empty line or end of input exits")
    p.add_argument("--no-adapter", action="store_true",
                   help="answer with the base model alone (to compare with the adapter)")
    p.add_argument("--model", help="base model (default: the one the adapter was trained on, "
                   "from its fedlora.json, else its adapter_config.json)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="most tokens to generate per reply (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy, deterministic (default); above 0 = sampling")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    p.add_argument("--raw", action="store_true",
                   help="send --prompt as it is, without the chat/instruction template (for "
                        "adapters trained on prompt/completion records)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse contradictory or incomplete flags before any model is loaded."""
    if (args.prompt is None) == (not args.chat):
        raise ValueError("pass either --prompt TEXT or --chat (one of them)")
    if args.adapter is None and not args.model:
        raise ValueError("pass --adapter DIR (its base model is used), or --model NAME with "
                         "--no-adapter")
    if args.adapter is None and not args.no_adapter:
        raise ValueError("no --adapter given: pass one, or --no-adapter to use the base model")
    if args.raw and args.chat:
        raise ValueError("--raw sends one prompt as it is; it does not combine with --chat")
    if args.adapter is not None:
        check_adapter(args.adapter)


def load(args: argparse.Namespace):
    """(model, tokenizer): the base model, with the adapter applied unless --no-adapter."""
    from fedlora.config import ModelSettings
    from fedlora.models import load_model

    name = base_model_name(args.adapter, args.model) if args.adapter else args.model
    what = "no adapter" if args.no_adapter else f"adapter {args.adapter}"
    print(f"fedlora: loading {name!r} ({what}) ...", file=sys.stderr)
    model, tokenizer, _ = load_model(ModelSettings(name=name, device=args.device))
    if not args.no_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(args.adapter))
    return model, tokenizer


def chat(model, tokenizer, args: argparse.Namespace, lines: TextIO, out: TextIO) -> None:
    """Answer each stdin line with the whole conversation so far as context."""
    from fedlora.inference import chat_prompt, generate

    messages: list[dict] = []
    while True:
        print("you> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line.strip():  # end of input or an empty line
            return
        messages.append({"role": "user", "content": line.strip()})
        reply = generate(model, tokenizer, [chat_prompt(messages, tokenizer)],
                         args.max_new_tokens, args.temperature)[0]
        messages.append({"role": "assistant", "content": reply})
        print(reply, file=out, flush=True)


def run(args: argparse.Namespace) -> int:
    """Load the model, then answer --prompt once or chat until an empty line."""
    check_arguments(args)
    import torch

    from fedlora.inference import generate, user_prompt

    model, tokenizer = load(args)
    torch.manual_seed(args.seed)
    if args.chat:
        chat(model, tokenizer, args, sys.stdin, sys.stdout)
        return 0
    prompt = args.prompt if args.raw else user_prompt(args.prompt, tokenizer)
    print(generate(model, tokenizer, [prompt], args.max_new_tokens, args.temperature)[0])
    return 0
