"""The generic population path: any module, one ``torch.func.functional_call`` per member.

For a module kind without a batched path (a custom module with its own parameters, ``nn.GRUCell``, ``nn.RMSNorm``,
a ``MultiheadAttention`` with ``bias_k``, ...), every perturbed parameter of the module's subtree gets dense
per-member values ``W + c E_k`` (``E_k`` of the parameter's noise law, so a tied parameter sees the same noise as
at its other uses), and the module's own forward runs once per member and sign on that member's rows, batched with
``torch.func.vmap`` where the forward allows it, else in a Python loop. :meth:`PerturbedModel.es_plan` reports which.

**Population dimension.** ``population_dim`` (0, or 1 inside a sequence-first transformer layer) of every tensor
argument whose size there is the population's ``repeat_size * n``; other arguments are passed unchanged. Every
tensor the forward returns must carry the population on the same dimension.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .units import UnitHost, unit_dense

__all__ = ["GenericHost"]


class GenericHost(UnitHost):
    """Mixin of a module (of any class) evaluated by the generic per-member path."""

    es_kind = "generic"
    #: ``"vmap"`` or ``"loop"`` once a population forward ran, ``None`` before.
    es_generic_path: str | None = None
    _es_inside = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The original forward, or the population's (one call per member and sign) when ``perturbed_flag`` is set.

        Args:
            *args: The module's positional arguments (population on ``population_dim``).
            **kwargs: The module's keyword arguments.

        Returns:
            What the module returns, with the population rows in place.
        """
        if not self.perturbed_flag or self._es_inside:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        return self._population_call(args, kwargs)

    def _population_call(self, args: tuple, kwargs: dict) -> Any:
        units = self._es_units
        pd = self.population_dim
        leaves, spec = pytree.tree_flatten((args, kwargs))
        rows = next((t.shape[pd] for t in leaves if isinstance(t, Tensor) and t.dim() > pd), None)
        if rows is None:
            raise ValueError(f"{type(self).__name__}: no tensor argument carries the population (dim {pd})")
        reps = units[0]._repeats((rows,))
        n = rows // reps
        signs = 2 if units[0].antithetic and reps > 1 else 1
        per = reps // signs  # rows of one member and sign
        values = {}
        for u in units:
            e = unit_dense(u)
            w = u.weight.detach() if not torch.is_grad_enabled() else u.weight
            values[id(u.weight)] = torch.cat([w + e, w - e]) if signs == 2 else w + e  # (signs*n, *shape)
        # one entry per (module object, attribute) holding a perturbed parameter: a submodule registered twice is
        # swapped once, a parameter tied between two modules at both (functional_call runs with tie_weights=False)
        params = {
            f"{prefix}.{name}" if prefix else name: values[id(t)]
            for prefix, module in self.named_modules()  # type: ignore[attr-defined]
            for name, t in module._parameters.items()
            if t is not None and id(t) in values
        }
        batched = [isinstance(t, Tensor) and t.dim() > pd and t.shape[pd] == rows for t in leaves]

        def split(t: Tensor) -> Tensor:  # (R*n at pd) -> (signs*n, ..., per at pd, ...)
            t = t.movedim(pd, 0).reshape(signs, per, n, *t.shape[:pd], *t.shape[pd + 1 :])
            return t.transpose(1, 2).reshape(signs * n, per, *t.shape[3:]).movedim(1, pd + 1)

        def merge(t: Tensor) -> Tensor:  # inverse of split
            t = t.movedim(pd + 1, 1)
            t = t.reshape(signs, n, per, *t.shape[2:]).transpose(1, 2).reshape(rows, *t.shape[2:])
            return t.movedim(0, pd)

        split_leaves = [split(t) if b else t for t, b in zip(leaves, batched)]

        # the output's structure and its non-tensor leaves (``None`` weights of an attention, ...): the same for
        # every member; the members return only the tensors (vmap and torch.stack take nothing else)
        out_tree: list[Any] = []

        def one(p: dict, member_leaves: list) -> tuple[Tensor, ...]:
            a, kw = pytree.tree_unflatten(member_leaves, spec)
            out = torch.func.functional_call(self, p, a, kw, tie_weights=False)  # type: ignore[arg-type]
            out_leaves, tree = pytree.tree_flatten(out)
            out_tree[:] = [tree, out_leaves]
            return tuple(t for t in out_leaves if isinstance(t, Tensor))

        self._es_inside = True
        try:
            try:
                in_dims = (dict.fromkeys(params, 0), [0 if b else None for b in batched])
                out = torch.func.vmap(one, in_dims=in_dims, randomness="different")(params, split_leaves)
                self.es_generic_path = "vmap"
            except Exception:  # a forward vmap cannot batch (in-place updates, data-dependent flow, ...)
                outs = []
                for v in range(signs * n):
                    pv = {k: t[v] for k, t in params.items()}
                    lv = [t[v] if b else t for t, b in zip(split_leaves, batched)]
                    outs.append(one(pv, lv))
                out = tuple(torch.stack(ts) for ts in zip(*outs))
                self.es_generic_path = "loop"
        finally:
            self._es_inside = False
        for k, t in enumerate(out):  # (signs*n, *member shape): each member's rows on population_dim
            if t.dim() <= pd + 1 or t.shape[pd + 1] != per:
                raise ValueError(
                    f"{type(self).__name__} (generic path): returned tensor {k} of shape {tuple(t.shape[1:])} per "
                    f"member does not carry the member's {per} row(s) on population_dim={pd}; every tensor the "
                    "forward returns must hold the population on that dimension"
                )
        tree, out_leaves = out_tree
        merged = iter(merge(t) for t in out)
        return pytree.tree_unflatten([next(merged) if isinstance(t, Tensor) else t for t in out_leaves], tree)
