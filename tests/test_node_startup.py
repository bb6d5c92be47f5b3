"""A node checks its own data when `fedlora client` starts, before it joins a federation:
records in a known form with the fields they need, answer tokens left after truncation (when
the node names its model), and an hf: dataset the hub cannot serve; each fails with one
line and exit code 2, and no SuperNode is started. `fedlora simulate` reports an unreachable
hf: dataset the same way."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from fedlora.cli.client import check_node_config
from fedlora.cli.main import main


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def unused_address() -> str:
    """127.0.0.1:<a port nothing listens on>."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def start_client(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`fedlora client` against a server address nothing listens on."""
    return subprocess.run([sys.executable, "-m", "fedlora.cli.main", "client", "--server",
                           unused_address(), "--insecure", "--name", "site-a", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_a_record_without_the_fields_of_a_form_is_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "2+2?", "output": "4"},
                                                {"question": "3+3?", "answer": "6"}])
    with pytest.raises(ValueError, match=rf"^--data-path: {path}:2: expected fields "
                                         rf"instruction/output .* found \['answer', 'question'\]"):
        check_node_config({"data-path": path, "node-name": "site-a"})
    mapped = "field-map=\"instruction=question,output=answer\""
    assert check_node_config({"data-path": path, "node-name": "site-a",
                              **dict([mapped.replace('"', "").split("=", 1)])}) is None


def test_a_file_whose_every_answer_is_truncated_away_names_max_length(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl",
                       [{"instruction": "word " * 40, "output": "yes"}] * 4)
    node = {"data-path": path, "node-name": "site-a", "model": "tiny-llama",
            "truncation": "right"}
    with pytest.raises(ValueError, match=r"^setting 'max-length': --data-path .*long.jsonl: "
                                         r"every one of its 4 training examples loses its "
                                         r"whole answer at max-length=16"):
        check_node_config({**node, "max-length": 16})
    assert check_node_config({**node, "max-length": 512}) is None  # room for the answer
    half = write_jsonl(tmp_path / "half.jsonl", [{"instruction": "word " * 40, "output": "yes"},
                                                 {"instruction": "2+2?", "output": "4"}] * 2)
    warning = check_node_config({**node, "data-path": half, "max-length": 64})
    assert warning is not None and "2 of 4 training examples lose their whole answer" in warning


def test_fedlora_client_with_bad_data_exits_2_before_starting_a_supernode(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "2+2?"}])
    proc = start_client("--data-path", path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedlora:")]
    assert lines == [f"fedlora: error: --data-path: {path}:1: expected fields "
                     f"{lines[0].split('expected fields ', 1)[1]}"]
    assert "Traceback" not in proc.stderr and "SuperNode" not in proc.stderr
    assert "client node ->" not in proc.stderr  # it never got as far as starting one


def test_fedlora_client_with_an_hf_dataset_offline_exits_2_with_one_line():
    proc = start_client("--data-path", "hf:someone/not-cached-anywhere",
                        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "SuperNode" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["fedlora: error: --data-path: could not reach the Hugging Face hub for "
                      "dataset someone/not-cached-anywhere; download it where you are online "
                      "(datasets.load_dataset(...).save_to_disk(folder)) and pass the "
                      "save_to_disk folder or a file"]


def test_fedlora_simulate_with_an_unreachable_hf_dataset_is_one_line_exit_2(tmp_path,
                                                                           monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):  # what datasets raises with HF_DATASETS_OFFLINE=1
        raise ConnectionError("Couldn't reach 'someone/x' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code = main(["simulate", "--model", "tiny-llama", "--num-clients", "2", "--dataset",
                 "hf:someone/x", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "fedlora: error: could not reach the Hugging Face hub for dataset someone/x" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_node_with_preference_pairs_starts_and_a_mix_of_forms_is_refused(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl",
                        [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}] * 3)
    assert check_node_config({"data-path": pairs, "node-name": "site-a",
                              "model": "tiny-llama"}) is None
    mixed = write_jsonl(tmp_path / "mixed.jsonl",
                        [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
                         {"instruction": "3+3?", "output": "6"}])
    with pytest.raises(ValueError, match=r"^--data-path: .*mixed.jsonl: objective=dpo trains "
                                         r"on preference records"):
        check_node_config({"data-path": mixed, "node-name": "site-a"})
