"""The slow obvious reference for whole models: each population row runs the plain module with its member's
perturbed parameters (float64, one row at a time)."""

from __future__ import annotations

import torch
from torch.func import functional_call


def member_parameters(pm, k: int, sign: float) -> dict[str, torch.Tensor]:
    """``{name: W + sign E_k}`` for every perturbed parameter (a tied parameter once: all its uses share E_k)."""
    names = {}
    for name, p in pm.model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = {}
    done = set()
    for unit in pm.perturbed_layers:
        e, eps = unit.dense_noise()
        for p, noise in ((unit.weight, e), (unit.bias, eps)):
            if p is None or id(p) in done:
                continue
            done.add(id(p))
            out[names[id(p)][0]] = p.detach() + sign * noise[k]  # functional_call ties the other names
    return out


def population_reference(pm, rows: int, call, antithetic: bool = True):
    """Outputs of ``call(params, i)`` for every population row ``i`` (``call`` slices row ``i``'s inputs and runs
    ``functional_call``); returns the list of per-row outputs."""
    n = pm.members.numel()
    reps = rows // n
    outs = []
    for i in range(rows):
        k, r = i % n, i // n
        sign = -1.0 if antithetic and reps > 1 and r >= reps // 2 else 1.0
        outs.append(call(member_parameters(pm, k, sign), i))
    return outs


def run_member(model, params, *args, **kwargs):
    """The plain forward (perturbed flags off) with ``params`` substituted."""
    with torch.no_grad():
        return functional_call(model, params, args, kwargs)
