"""Data-parallel local training on several devices of one node (`devices`, docs/deployment.md).

The node's process (rank 0: `fedlora client`'s resident worker, which holds the model it
evaluates with) and W-1 replica processes it starts itself (`ReplicaPool`, one per further
device, each with its own copy of the base) train one adapter together:

- every process draws the same micro-batches in the same order as one process would
  (`fedlora.train.loop.batches`, same seed), and rank i takes its slice of each (`rank_slice`:
  contiguous, sizes differ by at most one; a slice may be empty);
- each computes the summed loss over its slice's labelled tokens divided by the labelled
  tokens of the whole micro-batch (`labelled_tokens`), so the slices' losses add up to the
  micro-batch mean that one process minimises; FedProx's term is added by rank 0 only;
- after the step's micro-batches, the gradients of the trainable (adapter) parameters are
  summed over the processes (`DataParallel.sync`, one all-reduce), and every process clips and
  steps its identical optimizer on identical gradients: the adapters stay equal, and equal to
  the single-process update up to float summation order (tests/test_distributed.py: max abs
  difference <= 1e-5 after several steps).

objective=dpo splits each micro-batch by pairs: rank 0 scores the round's pairs with the
reference once (`fedlora.train.preference.with_reference`) and sends them, scores included,
with the job; each slice's preference loss is its share of the micro-batch's mean over pairs
(`LocalTraining.units`).

LoRA dropout is drawn per process (rank i seeds with seed + i): with lora-dropout > 0 the
update is distributed as the single-process one, not equal to it. dp-sgd (per-example
clipping, Poisson sampling of the whole step) and lora-moe (its balance term is not a sum over
examples) are refused with several processes (`refusal`).

Processes rendezvous on 127.0.0.1 (a TCPStore on a free port) with gloo on the CPU and nccl on
CUDA; a replica that fails reports its traceback and exits, which ends rank 0's collective
with an error (gloo at once, nccl by COLLECTIVE_TIMEOUT_S), and the pool is torn down and
started afresh for the next task.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fedlora.config import LoraSettings, ModelSettings, Settings, TrainSettings
from fedlora.data import IGNORE

T = TypeVar("T")
log = logging.getLogger("fedlora.distributed")
RENDEZVOUS_TIMEOUT_S = 120  # replicas import torch and fedlora, then join
COLLECTIVE_TIMEOUT_S = 600  # one optimizer step of the slowest process
READY_TIMEOUT_S = 3600  # a replica loads (and may quantize) its base before the first task
POLL_S = 0.5
ORPHAN_CHECK_S = 5.0  # an idle replica checks this often that rank 0 still runs


def rank_slice(items: Sequence[T], world: int, rank: int) -> list[T]:
    """Rank `rank` of `world`'s contiguous share of `items`: the first len % world ranks take
    one more; concatenated in rank order the slices are `items`."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} of a world of {world}: expected 0 <= rank < world")
    size, extra = divmod(len(items), world)
    start = rank * size + min(rank, extra)
    return list(items[start:start + size + (rank < extra)])


def labelled_tokens(examples: Sequence[dict]) -> int:
    """The positions `fedlora.train.loss.response_loss` averages over in a batch of
    `examples`: each example's labels after the first that are not IGNORE."""
    return sum(sum(1 for label in e["labels"][1:] if label != IGNORE) for e in examples)


def backend_for(devices: Sequence[str]) -> str:
    """gloo on the CPU, nccl on CUDA; a mix of the two is refused."""
    kinds = {d.split(":")[0] for d in devices}
    if kinds == {"cpu"}:
        return "gloo"
    if kinds == {"cuda"}:
        return "nccl"
    raise ValueError(f"devices {list(devices)}: expected all CPU or all CUDA devices, not a mix")


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the node's data-parallel group (torch.distributed's default
    group, already initialised)."""

    rank: int
    world: int

    def mine(self, batch: Sequence[T]) -> list[T]:
        """This process's slice of a micro-batch."""
        return rank_slice(batch, self.world, self.rank)

    def sync(self, params: Sequence[torch.nn.Parameter], *figures: float) -> list[float]:
        """Sum the gradients of `params` over the group (in place; a parameter without a
        gradient, after an empty slice, counts as zeros) and return `figures` summed too."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n
        sums = torch.tensor(figures, dtype=torch.float64, device=flat.device)  # nccl: on CUDA
        dist.all_reduce(sums)
        return sums.tolist()


def refusal(settings: Settings, hooks: Any, world: int) -> str | None:
    """Why a task cannot train with `world` processes (None: it can)."""
    if world == 1:
        return None
    fix = "run this node with --devices 1 (or shard a large base: --shard)"
    if settings.train.dp_sgd:
        return (f"dp-sgd with {world} processes: its Poisson sampling and per-example clipping "
                f"are defined over one process's step; {fix}")
    if settings.lora.peft == "lora-moe":
        return (f"peft=lora-moe with {world} processes: its load-balance term is not a sum over "
                f"examples, so slices do not add up to the one-process loss; {fix}")
    if hooks.keep is not None or hooks.on_batch is not None:
        return (f"the method {settings.federation.strategy!r} changes which parameters train "
                f"or routes micro-batches, which replica processes cannot repeat; {fix}")
    return None


@dataclass
class ReplicaJob:
    """What a replica needs to train the task rank 0 trains (all of it picklable)."""

    model: ModelSettings
    lora: LoraSettings
    train: TrainSettings
    residual: dict | None  # the frozen residual adapter's factors, or None
    params: dict[str, torch.Tensor]  # the trainable adapter's starting values, by name
    examples: list[dict]
    pad_id: int
    plan: Any  # fedlora.train.loop.RoundPlan
    proximal_mu: float
    desc: str


def adapter_parameters(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's parameters by name, on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()
            if adapter in n.split(".")}


def checksum(model: torch.nn.Module, adapter: str) -> float:
    """A float64 sum of the adapter's values: replicas that stayed in step agree on it."""
    return float(sum(p.detach().double().sum() for n, p in model.named_parameters()
                     if adapter in n.split(".")))


def _prepare(job: ReplicaJob, workspace: Any) -> tuple[Any, Any]:
    """(slot, hooks) of a replica for `job`: its model (loaded once per process) holding
    the job's residual and starting adapter."""
    from fedlora.adapters import set_residual
    from fedlora.train.hooks import LocalTraining

    slot = workspace.get(job.model, job.lora, job.train)
    set_residual(slot, job.lora, job.residual)
    named = dict(slot.model.named_parameters())
    unknown = sorted(set(job.params) - set(named))
    if unknown:
        raise KeyError(f"the job's adapter has parameters this replica's model lacks: "
                       f"{unknown[:3]}")
    with torch.no_grad():
        for name, value in job.params.items():
            named[name].copy_(value)
    hooks = slot.peft.training_hooks(slot.model, slot.adapter, job.lora,
                                     LocalTraining(proximal_mu=job.proximal_mu))
    if job.train.objective == "dpo":  # the pairs arrive scored by rank 0's reference
        from fedlora.train.preference import dpo_batch_loss

        hooks = replace(hooks, batch_loss=dpo_batch_loss(job.train.dpo_beta, job.train.dpo_loss,
                                                         job.pad_id), units=len)
    return slot, hooks


def _replica_main(rank: int, devices: list[str], port: int, inbox: Any, outbox: Any) -> None:
    """A replica process: join the group, then train each job rank 0 sends until None."""
    try:
        world, device = len(devices), devices[rank]
        if device == "cpu":  # share the cores with the other processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        else:
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False,
                              timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
        dist.init_process_group(backend_for(devices), store=store, rank=rank,
                                world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        from fedlora.adapters import Workspace
        from fedlora.train.loop import train_local

        workspace, parent = Workspace(), os.getppid()
        while True:
            try:
                job = inbox.get(timeout=ORPHAN_CHECK_S)
            except queue.Empty:
                if os.getppid() != parent:  # rank 0 is gone (killed): do not hold the device
                    break
                continue
            if job is None:
                break
            job = replace(job, model=replace(job.model, device=device, devices="1"))
            slot, hooks = _prepare(job, workspace)
            outbox.put(("ready", rank, None))
            train_local(slot.model, slot.adapter, job.examples, job.pad_id, job.train,
                        job.plan, hooks, desc=f"{job.desc} (replica {rank})",
                        parallel=DataParallel(rank, world))
            outbox.put(("done", rank, checksum(slot.model, slot.adapter)))
    except BaseException:
        outbox.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ReplicaPool:
    """Replica processes 1..W-1 of a node's data-parallel group, kept across tasks (each loads
    its base once); the process that makes the pool is rank 0, on devices[0]."""

    def __init__(self, devices: list[str]) -> None:
        """Start the replicas and join the group with them."""
        import torch.multiprocessing as mp

        if len(devices) < 2:
            raise ValueError(f"a replica pool needs two or more devices, got {devices}")
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group")
        self.devices, self.world = list(devices), len(devices)
        backend = backend_for(devices)
        if devices[0] != "cpu":
            torch.cuda.set_device(devices[0])
        store = dist.TCPStore("127.0.0.1", 0, self.world, is_master=True,
                              timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
                              wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(1, self.world)]
        self.procs = [ctx.Process(target=_replica_main, daemon=True,
                                  args=(r, self.devices, store.port, self.inboxes[r - 1],
                                        self.outbox))
                      for r in range(1, self.world)]
        for p in self.procs:
            p.start()
        try:
            dist.init_process_group(backend, store=store, rank=0, world_size=self.world,
                                    timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        except BaseException:
            self.close()
            raise
        log.info("data parallel: %d processes on %s (%s)", self.world,
                 ", ".join(self.devices), backend)

    def alive(self) -> bool:
        """Whether every replica still runs."""
        return all(p.is_alive() for p in self.procs)

    def _collect(self, kind: str, timeout_s: float) -> dict[int, Any]:
        """Each replica's next `kind` message; a replica's error or death raises."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(self.procs):
            try:
                what, rank, value = self.outbox.get(timeout=POLL_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs, 1) if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"data parallel: replica {dead[0]} "
                                       f"({self.devices[dead[0]]}) exited") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"data parallel: no {kind!r} from every replica within "
                                       f"{timeout_s:.0f} s") from None
                continue
            if what == "error":
                raise RuntimeError(f"data parallel: replica {rank} ({self.devices[rank]}) "
                                   f"failed:\n{value}")
            if what != kind:
                raise RuntimeError(f"data parallel: replica {rank} said {what!r}, "
                                   f"expected {kind!r}")
            got[rank] = value
        return got

    def train(self, job: ReplicaJob, slot: Any, hooks: Any) -> Any:
        """Train `slot` (rank 0's model, already holding the job's starting adapter) with the
        replicas; rank 0's TrainResult. Any failure closes the pool and raises."""
        from fedlora.train.loop import train_local

        if self.devices[0] != "cpu":  # the current CUDA device is per thread
            torch.cuda.set_device(self.devices[0])
        try:
            for inbox in self.inboxes:
                inbox.put(job)
            self._collect("ready", READY_TIMEOUT_S)
            result = train_local(slot.model, slot.adapter, job.examples, job.pad_id, job.train,
                                 job.plan, hooks, desc=job.desc,
                                 parallel=DataParallel(0, self.world))
            mine = checksum(slot.model, slot.adapter)
            for rank, theirs in self._collect("done", COLLECTIVE_TIMEOUT_S).items():
                if abs(theirs - mine) > 1e-6 * (1 + abs(mine)):
                    raise RuntimeError(f"data parallel: replica {rank}'s adapter (checksum "
                                       f"{theirs!r}) differs from rank 0's ({mine!r})")
            return result
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the replicas (asked, then terminated) and leave the group."""
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.procs = []
        if dist.is_initialized():
            dist.destroy_process_group()


def node_devices(model: ModelSettings, deployment: bool) -> list[str]:
    """The devices of a node's training processes (`fedlora.devices.resolve`): one entry with
    `shard` (the loader splits the model) and for a simulated client (`deployment` False),
    where devices=auto is one process and a spec of several processes is refused."""
    from fedlora.devices import resolve

    devices = resolve(model.devices, model.device, torch.cuda.device_count())
    if model.shard:
        if len(devices) < 2 or not all(d.startswith("cuda:") for d in devices):
            raise ValueError(f"setting 'shard': splits a model across two or more CUDA "
                             f"devices, but devices={model.devices!r} gives {devices}; list "
                             f"them (devices=0,1) or drop shard")
        return [devices[0]]
    if len(devices) > 1 and not deployment:
        if model.devices.strip() == "auto":
            return [model.device]
        raise ValueError(f"setting 'devices': {model.devices!r} starts several processes per "
                         f"client, which only a `fedlora client` node does; a simulation "
                         f"places each virtual client on one device (devices=auto or 1)")
    return devices


def train_parallel(devices: list[str], slot: Any, settings: Settings, examples: list[dict],
                   plan: Any, hooks: Any, residual: dict | None, desc: str) -> Any:
    """Train `slot` (rank 0's model, on devices[0], holding the starting adapter) with this
    process's replica pool for `devices`; rank 0's TrainResult."""
    problem = refusal(settings, hooks, len(devices))
    if problem:
        raise ValueError(problem)
    job = ReplicaJob(settings.model, settings.lora, settings.train, residual,
                     adapter_parameters(slot.model, slot.adapter), examples,
                     slot.tokenizer.pad_token_id, plan, hooks.proximal_mu, desc)
    return pool_for(devices).train(job, slot, hooks)


_POOL: ReplicaPool | None = None


def pool_for(devices: list[str]) -> ReplicaPool:
    """This process's replica pool for `devices`: the running one, or a new one (the old
    pool closed) when the devices changed or a replica died."""
    global _POOL
    if _POOL is not None and (_POOL.devices != devices or not _POOL.procs or not _POOL.alive()):
        _POOL.close()
        _POOL = None
    if _POOL is None:
        _POOL = ReplicaPool(devices)
    return _POOL


def close_pool() -> None:
    """Stop this process's replica pool, if any."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


atexit.register(close_pool)
