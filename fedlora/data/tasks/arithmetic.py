"""arithmetic: two-operand integer problems (+, -, *); the answer is the bare number."""

from __future__ import annotations

import random

from fedlora.data.tasks.registry import Record, same_number, task, unique

OPERATIONS = {"+": "addition", "-": "subtraction", "*": "multiplication"}


def arithmetic_example(rng: random.Random) -> Record:
    """One problem; `task` names the operation (kept from the first release of this task)."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 19), rng.randint(2, 19)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"instruction": f"Compute {a} {op} {b}. Reply with the number only.", "input": "",
            "output": str(answer), "task": OPERATIONS[op]}


def score(prediction: str, record: Record) -> bool:
    """The same number: `42`, ` 42.`, `42.0`, `1,234` all match; `42 apples` does not."""
    return same_number(prediction, record["output"])


@task("arithmetic", score)
def arithmetic(n: int, seed: int) -> list[Record]:
    """Two-operand integer arithmetic (+, -, *), distinct questions.

    Standalone records label the operation in `task` (addition, subtraction, multiplication);
    in `builtin:suite` `task` is "arithmetic" and the operation moves to `kind`.
    """
    return unique(arithmetic_example, n, seed)
