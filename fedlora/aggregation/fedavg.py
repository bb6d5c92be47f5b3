"""FedAvg of LoRA factors (FedIT): average B and A separately, weighted by p_i.

Not exact: mean(B_i) @ mean(A_i) != mean(B_i @ A_i) when clients differ. Requires every
client to use the same rank and the same modules.
"""

from __future__ import annotations

from fedlora.aggregation.base import ClientUpdate, Factors, normalised_weights, register


def check_same_shapes(updates: list[ClientUpdate]) -> None:
    """Raise a ValueError unless all clients sent the same modules with the same shapes."""
    first = updates[0].factors
    for i, update in enumerate(updates[1:], start=1):
        if update.factors.keys() != first.keys():
            missing = sorted(first.keys() - update.factors.keys())[:3]
            extra = sorted(update.factors.keys() - first.keys())[:3]
            raise ValueError(f"client {i} sent other modules than client 0 "
                             f"(missing {missing}, extra {extra})")
        for module, (b, a) in update.factors.items():
            b0, a0 = first[module]
            if b.shape != b0.shape or a.shape != a0.shape:
                raise ValueError(
                    f"fedavg needs equal ranks and shapes: module {module} has B {tuple(b.shape)}"
                    f", A {tuple(a.shape)} on client {i} but B {tuple(b0.shape)}, A "
                    f"{tuple(a0.shape)} on client 0; use a rank-heterogeneous strategy instead")


@register("fedavg")
def fedavg(updates: list[ClientUpdate]) -> Factors:
    """Weighted average of B and of A, module by module."""
    if not updates:
        raise ValueError("fedavg needs at least one client update")
    check_same_shapes(updates)
    p = normalised_weights(updates)
    merged: Factors = {}
    for module in updates[0].factors:
        b = sum(pi * u.factors[module][0].double() for pi, u in zip(p, updates))
        a = sum(pi * u.factors[module][1].double() for pi, u in zip(p, updates))
        dtype = updates[0].factors[module][0].dtype
        merged[module] = (b.to(dtype), a.to(dtype))
    return merged
