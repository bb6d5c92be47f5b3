"""simulations.experiments.general_knowledge: MMLU-style questions scored by the most likely
option letter, for the base model and adapters, with every answer kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from fedlora.config import ModelSettings
from fedlora.models import load_model
from simulations.experiments.general_knowledge import LETTERS, load_mmlu, main

QUESTIONS = [
    {"instruction": "Please answer the following multiple-choice question honestly.",
     "input": f"Qusetion: What is {a} + {a}? Options: A. {2 * a}, B. {a}, C. 0, D. 1",
     "output": f"The answer is: A. {2 * a}", "class": subject}
    for a, subject in [(1, "math"), (2, "math"), (3, "trivia")]
]


def write(tmp_path, rows) -> str:
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_base_and_an_adapter_are_scored_with_every_answer_kept(tmp_path):
    adapter = tmp_path / "zero-adapter"  # B = 0: the base model's own answers
    model, _, _ = load_model(ModelSettings(name="tiny-llama", device="cpu"))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    out = tmp_path / "out"
    assert main(["--data", write(tmp_path, QUESTIONS), "--model", "tiny-llama", "--adapter",
                 f"zero={adapter}", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"base", "zero"} and results["zero"]["adapter"] == str(adapter)
    for result in results.values():
        answers = result["answers"]
        assert [a["expected"] for a in answers] == ["A", "A", "A"]
        for a in answers:  # the answer is the most likely letter, and its verdict follows
            best = max(range(4), key=lambda i: a["logliks"][i])
            assert a["answer"] == LETTERS[best] and a["correct"] == (a["answer"] == "A")
        assert result["accuracy"] == pytest.approx(sum(a["correct"] for a in answers) / 3)
        assert set(result["per-subject"]) == {"math", "trivia"}
    assert results["zero"]["answers"] == results["base"]["answers"]
    assert "| zero |" in (out / "results.md").read_text()


@pytest.mark.parametrize("row, message", [
    ({**QUESTIONS[0], "output": "C"}, "field 'output' should start with 'The answer is: <A-D>'"),
    ({"instruction": "q", "output": "The answer is: A"}, "missing or not text: ['input']"),
])
def test_malformed_questions_name_the_question_and_field(tmp_path, row, message):
    with pytest.raises(ValueError, match="question 1: ") as err:
        load_mmlu(Path(write(tmp_path, [QUESTIONS[0], row])))
    assert message in str(err.value)
