"""A node's two CUDA devices (fedlora/train/distributed.py, fedlora/models/loader.py): two
nccl processes train the adapter one process trains, and --shard splits a 4-bit base across
both. Marked `gpu` and skipped without two CUDA devices (`scripts/gpu-check.sh` runs them)."""

from __future__ import annotations

import pytest
import torch
from test_distributed import adapter_parameters, fresh_slot, settings_for, started, tiny_examples

from fedlora.adapters import Workspace
from fedlora.config import Settings
from fedlora.train import evaluate
from fedlora.train.distributed import ReplicaJob, ReplicaPool
from fedlora.train.hooks import LocalTraining
from fedlora.train.loop import RoundPlan, train_local

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]

# fp32 on both: the slices' attention kernels see other batch shapes than the whole batch's
GPU_TOLERANCE = 1e-4


def test_two_nccl_processes_train_the_adapter_one_process_trains():
    settings = settings_for(device="cuda:0", **{"compute-dtype": "float32"})
    start = started(settings)
    alone_slot = fresh_slot(settings, start)
    examples = tiny_examples(alone_slot)
    single = train_local(alone_slot.model, alone_slot.adapter, examples,
                         alone_slot.tokenizer.pad_token_id, settings.train,
                         RoundPlan(1, 3, seed=7), LocalTraining())
    alone = adapter_parameters(alone_slot.model, alone_slot.adapter)
    slot = fresh_slot(settings, start)
    pool = ReplicaPool(["cuda:0", "cuda:1"])
    try:
        job = ReplicaJob(settings.model, settings.lora, settings.train, None, start, examples,
                         slot.tokenizer.pad_token_id, RoundPlan(1, 3, seed=7), 0.0, "dp")
        hooks = slot.peft.training_hooks(slot.model, slot.adapter, settings.lora,
                                         LocalTraining())
        result = pool.train(job, slot, hooks)
    finally:
        pool.close()
    together = adapter_parameters(slot.model, slot.adapter)
    assert max(float((together[k] - alone[k]).abs().max()) for k in alone) <= GPU_TOLERANCE
    assert max(float((together[k] - start[k]).abs().max()) for k in start) > 1e-3
    assert result.tokens == single.tokens


def deep_tiny_llama(folder) -> str:
    """tiny-llama with 8 layers (2 would fit one device's balanced share): its folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlora.models.builtin import tiny_llama_dir

    config = LlamaConfig.from_pretrained(tiny_llama_dir())
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir()).save_pretrained(folder)
    return str(folder)


def test_shard_splits_a_4bit_base_across_two_devices_and_trains(tmp_path):
    settings = Settings.from_config({"model": deep_tiny_llama(tmp_path / "deep"),
                                     "quantization": "4bit",
                                     "devices": "0,1", "shard": True, "device": "cuda",
                                     "lora-rank": 4, "local-steps": 10, "lr": 1e-2,
                                     "dataset-size": 60, "batch-size": 2})
    slot = Workspace().get(settings.model, settings.lora, settings.train)
    placed = set(slot.model.get_base_model().hf_device_map.values())
    assert len(placed) == 2, placed
    examples, pad = tiny_examples(slot), slot.tokenizer.pad_token_id
    before = evaluate(slot.model, examples[:8], pad).loss
    train_local(slot.model, slot.adapter, examples, pad, settings.train, RoundPlan())
    assert evaluate(slot.model, examples[:8], pad).loss < before
    trained = {p.device for n, p in slot.model.named_parameters() if p.requires_grad}
    assert len(trained) == 2  # LoRA factors sit next to their layers on both devices
