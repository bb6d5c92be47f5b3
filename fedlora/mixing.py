"""Adapter mixing (LoraHub, Huang et al. 2023): trained LoRA adapters of one base model
composed into one PEFT LoRA adapter whose update is delta W = sum_i w_i delta W_i.

The composition is exact: adapter i's factors (its LoRA scale folded into B, `fedlora.factors`)
are stacked along the rank, B = [w_1 B_1 | ... | w_n B_n] and A = [A_1; ...; A_n], so that
B A = sum_i w_i B_i A_i in every module, whatever the adapters' ranks, alphas or rsLoRA. The
mixed adapter has rank R = sum_i r_i and scale 1 (lora_alpha = R); a module some adapter does
not adapt gets zero blocks there. It loads with `PeftModel.from_pretrained`.

Weights are given (`--weights`) or searched on a few examples (`--data`), LoraHub's way: the
loss of the mixed model on those examples plus an L1 penalty on the weights, minimised by a
seeded gradient-free search (a (1+1) evolution strategy with the 1/5 success rule) or by
gradient descent on the weights (delta W is linear in them, so dL/dw_i = <dL/dB_i', B_i> over
adapter i's block B_i' = w_i B_i of the stacked B). Sources: an adapter folder (a run's final/
or rounds/<n>/, or any PEFT LoRA adapter of the same base), or a fedsa-lora client's own model
`<run>/personal/client-<pid>.safetensors` (the run's shared factors with that client's private
ones).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedlora.aggregation import Factors
from fedlora.config import lora_scale
from fedlora.factors import from_peft

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class Source:
    """One adapter to mix: where it came from, its factors (delta-W scale) and its base."""

    name: str
    factors: Factors
    base: str  # the base model it was trained on (fedlora's model name, else PEFT's base id)

    @property
    def rank(self) -> int:
        """The adapter's rank (of its first module; fedlora adapters share one)."""
        return next(iter(self.factors.values()))[0].shape[1]


def personal_state(run: Path, private: Path) -> dict[str, torch.Tensor]:
    """A fedsa-lora client's own model: the run's final adapter with the client's private
    factors (`private`, from the run's personal/ folder) in place of the server's."""
    state, own = load_file(str(run / "final" / ADAPTER_FILES[1])), load_file(str(private))
    if not own or own.keys() - state.keys():
        raise ValueError(f"{private}: expected some of the keys of {run / 'final'}'s adapter "
                         f"(a fedsa-lora client's private factors), got {sorted(own)[:3]}")
    return {**state, **own}


def personal_adapter(run: Path, pid: int) -> Path:
    """Client `pid`'s own model of a fedsa-lora run written as a PEFT adapter folder
    (<run>/client-<pid>/): the run's final adapter with `personal_state` in place of its
    weights."""
    import shutil

    from safetensors.torch import save_file

    out = run / f"client-{pid}"
    shutil.copytree(run / "final", out, dirs_exist_ok=True)
    state = personal_state(run, run / "personal" / f"client-{pid}.safetensors")
    save_file(state, str(out / ADAPTER_FILES[1]), metadata={"format": "pt"})
    return out


def read_source(spec: str) -> Source:
    """The LoRA adapter `spec` names: an adapter folder, or
    `<run>/personal/client-<pid>.safetensors` (a fedsa-lora client's own model)."""
    path = Path(spec)
    if path.suffix == ".safetensors" and path.parent.name == "personal":
        folder, state = path.parent.parent / "final", personal_state(path.parent.parent, path)
    elif path.is_dir():
        folder, state = path, None
    else:
        raise FileNotFoundError(f"{spec}: expected a LoRA adapter folder "
                                f"({', '.join(ADAPTER_FILES)}) or a fedsa-lora run's "
                                f"personal/client-<pid>.safetensors")
    missing = [f for f in ADAPTER_FILES if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {', '.join(missing)} "
                                f"missing")
    config = json.loads((folder / ADAPTER_FILES[0]).read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
        raise ValueError(f"{spec}: a {kind} adapter; mixing composes LoRA adapters (delta W = "
                         f"B A), so pass LoRA adapters only")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{spec}: per-module ranks or alphas (rank_pattern/alpha_pattern) are "
                         f"not supported; pass adapters with one rank and alpha")
    if state is None:
        state = load_file(str(folder / ADAPTER_FILES[1]))
    scale = lora_scale(int(config["r"]), float(config["lora_alpha"]),
                       bool(config.get("use_rslora")))
    info = folder / "fedlora.json"
    base = (json.loads(info.read_text()).get("model") if info.exists() else None) or \
        config.get("base_model_name_or_path") or "?"
    return Source(spec, from_peft(state, scale), str(base))


def check_sources(sources: list[Source]) -> None:
    """At least two adapters, one base model, and equal layer shapes where they share one."""
    if len(sources) < 2:
        raise ValueError(f"mixing needs at least two adapters, got {len(sources)}")
    bases = sorted({s.base for s in sources})
    if len(bases) > 1:
        raise ValueError("the adapters were trained on different base models "
                         + ", ".join(f"{s.name}: {s.base}" for s in sources)
                         + "; mix adapters of one base model")
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for s in sources:
        for module, (b, a) in s.factors.items():
            shape = (b.shape[0], a.shape[1])
            seen = shapes.setdefault(module, (shape, s.name))
            if seen[0] != shape:
                raise ValueError(f"module {module}: {seen[1]} adapts a {seen[0][0]} x "
                                 f"{seen[0][1]} layer, {s.name} a {shape[0]} x {shape[1]} one; "
                                 f"the adapters are not of one base model")


def mix(sources: list[Source], weights: list[float]) -> Factors:
    """Factors whose product is sum_i w_i B_i A_i in every module (rank sum_i r_i; zero blocks
    where an adapter does not adapt a module)."""
    if len(weights) != len(sources):
        raise ValueError(f"expected one weight per adapter ({len(sources)}), got {len(weights)}")
    modules = sorted({m for s in sources for m in s.factors})
    out: Factors = {}
    for module in modules:
        d, k = next((b.shape[0], a.shape[1]) for s in sources
                    for m, (b, a) in s.factors.items() if m == module)
        bs, as_ = [], []
        for s, w in zip(sources, weights):
            b, a = s.factors.get(module, (torch.zeros(d, s.rank), torch.zeros(s.rank, k)))
            bs.append(w * b.float())  # (d, r_i)
            as_.append(a.float())  # (r_i, k)
        out[module] = (torch.cat(bs, dim=1), torch.cat(as_, dim=0))  # (d, R), (R, k)
    return out


# ---- searching the weights on a few examples ----------------------------------------------------

class MixedModel:
    """The base model with one LoRA adapter of rank R = sum_i r_i holding the stacked A and the
    blocks of B; `set_weights` rescales B's blocks in place (nothing else changes)."""

    def __init__(self, model: torch.nn.Module, sources: list[Source], adapter: str) -> None:
        self.model, self.sources = model, sources
        stacked = mix(sources, [1.0] * len(sources))
        self.layers = {}  # module -> (its lora_B weight, the unweighted stacked B)
        named = dict(model.named_modules())
        for module, (b, a) in stacked.items():
            layer = named[module]  # wire keys name modules as the PeftModel does
            with torch.no_grad():
                layer.lora_A[adapter].weight.copy_(a)
            layer.lora_A[adapter].weight.requires_grad_(False)
            self.layers[module] = (layer.lora_B[adapter].weight, b)
        model.eval()  # no dropout (there is none: rank R at dropout 0), no training mode
        self.blocks = [s.rank for s in sources]

    def set_weights(self, weights: list[float] | torch.Tensor) -> None:
        """B = [w_1 B_1 | ... | w_n B_n] in every module."""
        scale = torch.repeat_interleave(torch.as_tensor(weights, dtype=torch.float32),
                                        torch.tensor(self.blocks))  # (R,)
        with torch.no_grad():
            for weight, b in self.layers.values():
                weight.copy_(b.to(weight.device) * scale.to(weight.device))

    def weight_gradient(self) -> torch.Tensor:
        """dL/dw_i = sum over modules of <dL/dB'_i, B_i>, B'_i being block i of the current B."""
        grad = torch.zeros(len(self.blocks))
        for weight, b in self.layers.values():
            if weight.grad is None:
                continue
            products = (weight.grad.float().cpu() * b).sum(dim=0)  # (R,)
            grad += torch.stack([part.sum() for part in products.split(self.blocks)])
        return grad


def mixed_model(sources: list[Source], device: str = "cpu"):
    """(MixedModel, tokenizer) on the sources' base model."""
    from fedlora.adapters import add_lora
    from fedlora.config import LoraSettings, ModelSettings
    from fedlora.models import load_model

    base, tokenizer, _ = load_model(ModelSettings(name=sources[0].base, device=device,
                                                  compute_dtype="float32"))
    rank = sum(s.rank for s in sources)
    targets = sorted({m.rsplit(".", 1)[-1] for s in sources for m in s.factors})
    lora = LoraSettings(rank=rank, alpha=float(rank), dropout=0.0,
                        target_modules=",".join(targets))
    model = add_lora(base, lora, "mix")
    return MixedModel(model, sources, "mix"), tokenizer


def example_batches(records: list[dict], tokenizer, device: str, max_length: int = 256,
                    batch_size: int = 8) -> list[dict]:
    """The few examples as padded batches on `device`, tokenized as training tokenizes them
    (the loss counts the response tokens only)."""
    from fedlora.data import collate, tokenize

    if not records:
        raise ValueError("no examples to search the weights on")
    examples = [tokenize(r, tokenizer, max_length) for r in records]
    return [{k: v.to(device) for k, v in collate(examples[i:i + batch_size],
                                                 tokenizer.pad_token_id).items()}
            for i in range(0, len(examples), batch_size)]


def objective(mixed: MixedModel, batches: list[dict], weights: list[float], l1: float) -> float:
    """Mean response loss of the mixed model on the examples, plus l1 * sum |w_i|."""
    from fedlora.train.loss import response_loss

    mixed.set_weights(weights)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss, tokens = response_loss(mixed.model, batch)
            total, count = total + float(loss) * tokens, count + tokens
    return total / max(count, 1) + l1 * sum(abs(w) for w in weights)


def evolution_search(mixed: MixedModel, batches: list[dict], steps: int, seed: int, l1: float,
                     bound: float = 1.5) -> tuple[list[float], list[float]]:
    """A seeded (1+1) evolution strategy from the uniform weights 1/n: each step perturbs the
    weights with Gaussian noise of size sigma (clipped to [-bound, bound], LoraHub's range),
    keeps the child when it is no worse, and grows sigma on a success, shrinks it otherwise
    (the 1/5 success rule). Returns (best weights, the best objective after each step)."""
    rng = random.Random(seed)
    n = len(mixed.sources)
    best = [1.0 / n] * n
    best_value, sigma, history = objective(mixed, batches, best, l1), 0.3, []
    for _ in range(steps):
        child = [min(bound, max(-bound, w + rng.gauss(0.0, sigma))) for w in best]
        value = objective(mixed, batches, child, l1)
        if value <= best_value:
            best, best_value, sigma = child, value, sigma * 1.5
        else:
            sigma *= 1.5 ** -0.25
        history.append(best_value)
    return best, history


def gradient_search(mixed: MixedModel, batches: list[dict], steps: int, seed: int, l1: float,
                    lr: float = 0.05) -> tuple[list[float], list[float]]:
    """Adam on the weights from the uniform 1/n, with the L1 penalty's subgradient; the
    seed fixes nothing random here but is kept for a common signature. Returns (the weights
    with the best objective seen, that objective after each step)."""
    from fedlora.train.loss import response_loss

    del seed
    n = len(mixed.sources)
    weights = torch.full((n,), 1.0 / n, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=lr)
    params = [w for w, _ in mixed.layers.values()]
    for p in params:
        p.requires_grad_(True)
    best, best_value, history = weights.tolist(), math.inf, []
    for _ in range(steps):
        mixed.set_weights(weights.detach())
        for p in params:
            p.grad = None
        total, count = 0.0, sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:
            loss, tokens = response_loss(mixed.model, batch)
            (loss * tokens / max(count, 1)).backward()
            total += float(loss.detach()) * tokens
        value = total / max(count, 1) + l1 * float(weights.detach().abs().sum())
        if value < best_value:
            best, best_value = weights.tolist(), value
        history.append(best_value)
        optimizer.zero_grad()
        weights.grad = mixed.weight_gradient() + l1 * torch.sign(weights.detach())
        optimizer.step()
    return best, history


SEARCHES = {"evolution": evolution_search, "gradient": gradient_search}
