r"""Estimates at inference memory (``memory="inference"``): one member at a time, directions regenerated, no drift.

The batched mode evaluates a chunk of members in one vectorised call on stacked perturbed parameters, so its memory
grows with the chunk. In this mode the members are evaluated one after another and a direction is never stored:
the direction $z_{k,j}$ of member ``k`` for parameter ``j`` is a pure function of ``(seed, step, k, j)`` and is
drawn again each time it is needed (to perturb, then to accumulate the gradient or update the parameter), as in
MeZO (Malladi et al. 2023). Unlike MeZO, a parameter is **never written** while estimating: MeZO's in-place
``+σz, −2σz, +σz`` leaves rounding residue in every weight (fatal in fp16/bf16), here every parameter is
bit-identical after an estimate.

How a member sees ``θ + cσz`` (``c = ±1``):

* module API (`ZeroOrderGradientModule`, `ZOSGD`): a forward pre-hook on each module that holds a
  trainable parameter puts a new tensor ``θ + cσz`` (computed in at least float32, rounded once to the parameter's
  dtype) in the module's parameter slot for the duration of that module's forward, and a forward hook puts the
  Parameter back. Perturbed weights exist one layer at a time, so the extra memory is about one layer's weight.
  A parameter held by two modules (tied) is perturbed identically in both (the direction is regenerated). A
  parameter that code reads outside its owner's forward (a parent reading ``self.child.weight``, a
  ``ParameterList`` entry, the root module's own parameters) is found on the first evaluation of each estimate
  (a ``TorchFunctionMode`` watches for the unperturbed Parameter) and is then perturbed for the whole evaluation.
* functional API (`zero_order`, `estimate_gradient`): the function takes the parameters as arguments, so
  each member gets one perturbed copy of the differentiated leaves (extra memory: those leaves, once).

Noise: a seeded distribution (`SeededNormal`, ...) draws row ``k`` of the same stream as the batched mode, so both
modes use the same directions. Any other distribution is drawn under a per-``(estimate, k, j)`` seed of torch's
generator (a ``torch.distributions.Normal`` with scalar parameters on a private generator; other samplers inside
``torch.random.fork_rng``); the estimate's base seed comes from torch's global RNG, so ``torch.manual_seed``
makes runs reproducible. A sampler that does not draw from torch's RNG cannot be regenerated and is refused.

All methods take two passes: all members are evaluated (scalars kept), then the weights are computed and every
direction is drawn once more to form ``Σ_k w_k z_k`` (the ``.grad`` path) or to step the parameter in place
(`ZOSGD`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ._noise import NoiseSource, compute_dtype
from ._reads import ValueReads
from .estimators import ANTITHETIC_METHODS, direction_weights
from .population import check_output

__all__ = ["MEMORY_MODES", "MemberNoise", "ModulePerturbation", "member_weights", "perturbed"]

#: Accepted values of ``memory=``.
MEMORY_MODES: tuple[str, ...] = ("batched", "inference")

_MASK64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """A 63-bit seed from integers (splitmix64 chained over the words); distinct tuples give unrelated seeds."""
    h = 0x243F6A8885A308D3
    for w in words:
        z = (h ^ (w & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


class MemberNoise:
    """The direction of one member for one parameter, drawn again on every request (never stored).

    Args:
        source: The estimate's noise source (validated distribution).
    """

    def __init__(self, source: NoiseSource) -> None:
        self.source = source
        self.step = 0
        self.base = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def start(self, params: Sequence[Tensor]) -> None:
        """Begin an estimate: take its step (seeded) or base seed (torch's global RNG), check regenerability.

        Raises:
            ValueError: If the distribution returns different noise under the same torch seed.
        """
        self.step = self.source.new_step()
        if self.source.seeded:
            return
        self.base = int(torch.randint(0, 1 << 62, (), dtype=torch.int64))
        if self.source._fast_normal is None and params:
            j = min(range(len(params)), key=lambda i: params[i].numel())
            first, _ = self.direction(j, 0, params[j])
            again, _ = self.direction(j, 0, params[j])
            # exact: the same sampler called twice under the same seed; a regenerable sampler repeats bit for bit
            if not torch.equal(first, again):
                raise ValueError(
                    "memory='inference' draws every direction again from its seed, but `distribution` returned "
                    "different noise under the same torch seed (it does not draw from torch's RNG); use a seeded "
                    "distribution such as SeededNormal, torch.distributions.Normal, or a sampler built on torch's RNG"
                )

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    def direction(self, leaf: int, member: int, p: Tensor) -> tuple[Tensor, bool]:
        """``z`` of ``member`` for parameter ``leaf`` (shape and device of ``p``, at least float32).

        Returns:
            The direction and whether it is a new private tensor (the caller may overwrite it).
        """
        source = self.source
        if source.seeded:
            z, fresh = source.draw_fresh(
                leaf, p.shape, p.device, p.dtype, range(member, member + 1), self.step
            )
            return z[0], fresh
        seed = _mix(self.base, member, leaf)
        dtype = compute_dtype(p.dtype)
        fast = source._fast_normal
        if fast is not None:
            gen = self._generator(p.device)
            gen.manual_seed(seed)
            z = torch.randn(p.shape, generator=gen, dtype=dtype, device=p.device)
            loc, scale = fast
            if scale != 1.0:
                z.mul_(scale)
            if loc != 0.0:
                z.add_(loc)
            return z, True
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            z, fresh = source.draw_fresh(leaf, p.shape, p.device, p.dtype, range(1), 0)
        return z[0], fresh


def perturbed(p: Tensor, z: Tensor, fresh: bool, coefficient: float) -> Tensor:
    """A new tensor ``p + coefficient·z`` in ``p``'s dtype (computed in ``z``'s dtype, rounded once); ``p`` is never
    written, and ``z`` is overwritten when ``fresh``."""
    with torch.no_grad():
        out = torch.add(p, z, alpha=coefficient, out=z) if fresh else torch.add(p, z, alpha=coefficient)
        return out if out.dtype == p.dtype else out.to(p.dtype)


def member_weights(
    evaluate: Callable[[int, float], Any],
    options: Any,
    f0: Tensor | None,
    device: torch.device,
    value_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate every member in turn and return the direction weights ``w_k``, the values and whether all are finite.

    Args:
        evaluate: ``evaluate(k, c)`` returns ``f(θ + c z_k)`` for ``c = ±σ``.
        options: The `EstimatorOptions`.
        f0: The unperturbed value (``forward`` only).
        device: Where the values are combined.
        value_dtype: float32, or float64 when a parameter is.

    Returns:
        ``(weights (N,), values (N or 2N,), finite)``.
    """
    method, n_dir, sigma = options.method, options.num_samples, options.sigma
    antithetic = method in ANTITHETIC_METHODS
    plus: list[Tensor] = []
    minus: list[Tensor] = []
    for k in range(n_dir):
        plus.append(_value(evaluate(k, sigma), device, value_dtype))
        if antithetic:
            minus.append(_value(evaluate(k, -sigma), device, value_dtype))
    f_plus = torch.stack(plus)
    f_minus = torch.stack(minus) if antithetic else None
    values = f_plus if f_minus is None else torch.cat([f_plus, f_minus])
    finite = torch.isfinite(values).all()
    if f0 is not None:
        f0 = f0.detach().to(device=device, dtype=value_dtype)
        finite &= torch.isfinite(f0)
    weights = direction_weights(
        method, f_plus, f_minus=f_minus, f0=f0, sigma=sigma, num_directions=n_dir, top_k=options.top_k
    )
    return weights, values, finite


def _value(output: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
    return check_output(output).detach().to(device=device, dtype=dtype)


def accumulate(params: Sequence[Tensor], noise: MemberNoise, weights: Tensor) -> list[Tensor]:
    """``Σ_k w_k z_k`` per parameter, each direction drawn again (in at least float32)."""
    w = weights.tolist()
    grads = []
    for j, p in enumerate(params):
        grad = torch.zeros(p.shape, dtype=compute_dtype(p.dtype), device=p.device)
        for k, wk in enumerate(w):
            z, _ = noise.direction(j, k, p)
            grad.add_(z, alpha=wk)
            del z  # freed before the next draw: one direction alive at a time, not two
        grads.append(grad)
    return grads


def value_dtype_of(params: Sequence[Tensor]) -> torch.dtype:
    """float64 when a parameter is float64, else float32 (as the batched mode)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


@torch.no_grad()
def run_functional(
    fn: Callable[..., Any],
    params: Sequence[Tensor],
    source: NoiseSource,
    options: Any,
    grad_output: Tensor | float = 1.0,
    f0: Tensor | None = None,
) -> list[Tensor]:
    """The estimate of `estimate_gradient` / `zero_order` at inference memory: ``fn(*leaves)`` per member with one
    perturbed copy of the leaves (the parameters themselves are never written).

    Returns:
        One gradient per parameter, in its dtype.
    """
    from .gradient import _finish, check_sigma_resolution

    params = list(params)
    check_sigma_resolution(params, [None] * len(params), options.sigma)
    noise = MemberNoise(source)
    noise.start(params)

    def evaluate(k: int, c: float) -> Any:
        leaves = []
        for j, p in enumerate(params):
            z, fresh = noise.direction(j, k, p)
            leaves.append(perturbed(p, z, fresh, c))
            del z
        return fn(*leaves)

    device = params[0].device
    dtype = value_dtype_of(params)
    g = torch.as_tensor(grad_output, dtype=dtype).to(device)
    weights, _, finite = member_weights(evaluate, options, f0, device, dtype)
    grads = accumulate(params, noise, weights * g)
    return _finish(grads, params, finite, g)


def _set(m: nn.Module, name: str, value: Tensor) -> None:
    """Put ``value`` in ``m``'s parameter slot ``name`` (and in the weight list an ``nn.RNNBase`` forward reads)."""
    m._parameters[name] = value  # type: ignore[assignment]
    names = getattr(m, "_flat_weights_names", None)
    if isinstance(names, list) and name in names:
        m._flat_weights[names.index(name)] = value  # type: ignore[index,operator]


class ModulePerturbation:
    """Shows member ``k``'s parameters ``θ + cσz_k`` to a module's forward, one owning module at a time.

    Use as a context manager (it registers the hooks) and call `evaluate` per member.

    Args:
        module: The module whose submodules hold the parameters.
        params: The trainable parameters to perturb (distinct tensors); parameter ``j`` draws directions for leaf
            ``j``.
        noise: The estimate's `MemberNoise`.
        whole: Indices of parameters perturbed for the whole evaluation rather than inside their owner's forward.

    Raises:
        ValueError: If a parameter is held by no submodule of ``module``.
    """

    def __init__(
        self, module: nn.Module, params: Sequence[Tensor], noise: MemberNoise, whole: set[int] | None = None
    ) -> None:
        self.params, self.noise = list(params), noise
        index = {id(p): j for j, p in enumerate(self.params)}
        self.owned: dict[nn.Module, list[tuple[str, int]]] = {}
        self.holders: list[list[tuple[nn.Module, str]]] = [[] for _ in self.params]
        for m in module.modules():
            for name, t in m._parameters.items():
                if t is not None and id(t) in index:
                    self.owned.setdefault(m, []).append((name, index[id(t)]))
                    self.holders[index[id(t)]].append((m, name))
        missing = [j for j, held in enumerate(self.holders) if not held]
        if missing:
            raise ValueError(
                f"parameter {missing[0]} (shape {tuple(self.params[missing[0]].shape)}) is not held by any submodule "
                "of the module whose forward is evaluated, so it cannot be perturbed; optimise only that module's "
                "parameters"
            )
        self.whole: set[int] = set(whole or ())
        self.member: tuple[int, float] | None = None
        self.depth: dict[int, int] = {}
        self.installed: dict[tuple[int, str], tuple[nn.Module, str, Tensor]] = {}
        self.handles: list[Any] = []
        self.detector: ValueReads | None = None

    def __enter__(self) -> ModulePerturbation:
        for m in self.owned:
            # first among the pre-hooks (the module's own hooks see the perturbed weight), last among the hooks
            self.handles.append(m.register_forward_pre_hook(self._pre, prepend=True))
            self.handles.append(m.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._restore_all()

    def _perturbed(self, j: int) -> Tensor:
        assert self.member is not None
        k, c = self.member
        p = self.params[j]
        if self.detector is not None:
            self.detector.paused += 1
        try:
            z, fresh = self.noise.direction(j, k, p)
            return perturbed(p, z, fresh, c)
        finally:
            if self.detector is not None:
                self.detector.paused -= 1

    def _install(self, m: nn.Module, name: str, value: Tensor) -> None:
        self.installed[(id(m), name)] = (m, name, m._parameters[name])  # type: ignore[assignment]
        _set(m, name, value)

    def _restore(self, m: nn.Module, name: str) -> None:
        entry = self.installed.pop((id(m), name), None)
        if entry is not None:
            _set(m, name, entry[2])

    def _restore_all(self) -> None:
        for m, name, original in reversed(list(self.installed.values())):
            _set(m, name, original)
        self.installed.clear()
        self.depth.clear()

    def _pre(self, m: nn.Module, args: Any) -> None:
        if self.member is None:
            return
        depth = self.depth.get(id(m), 0)
        self.depth[id(m)] = depth + 1
        if depth:
            return  # the module is already perturbed (called from within its own forward)
        for name, j in self.owned[m]:
            if j not in self.whole:
                self._install(m, name, self._perturbed(j))

    def _post(self, m: nn.Module, args: Any, output: Any) -> None:
        if self.member is None or id(m) not in self.depth:
            return
        self.depth[id(m)] -= 1
        if self.depth[id(m)]:
            return
        del self.depth[id(m)]
        for name, j in self.owned[m]:
            if j not in self.whole:
                self._restore(m, name)

    @contextlib.contextmanager
    def _member(self, k: int, c: float) -> Iterator[None]:
        self.member = (k, c)
        try:
            for j in sorted(self.whole):
                value = self._perturbed(j)
                for m, name in self.holders[j]:
                    self._install(m, name, value)
            yield
        finally:
            self.member = None
            self._restore_all()

    def evaluate(self, k: int, c: float, forward: Callable[[], Any], detect: bool = False) -> Any:
        """``forward()`` with member ``k``'s parameters ``θ + c z_k`` (``c = ±σ``).

        With ``detect``, parameters read outside their owner's forward are found and moved to whole-evaluation
        scope, and the member is evaluated again until none is left.
        """
        if not detect:
            with self._member(k, c):
                return forward()
        watched = {id(p): j for j, p in enumerate(self.params)}
        while True:
            self.detector = ValueReads(watched)
            try:
                with self._member(k, c), self.detector:
                    value = forward()
            finally:
                found, self.detector = self.detector.found, None
            if not found - self.whole:
                return value
            self.whole |= found


def trainable_owned_by(module: nn.Module, params: Sequence[Tensor]) -> set[int]:
    """Indices of ``params`` held directly by ``module`` (its own ``_parameters``)."""
    own = {id(t) for t in module._parameters.values() if t is not None}
    return {j for j, p in enumerate(params) if id(p) in own}


@torch.no_grad()
def run_module(
    module: nn.Module,
    forward: Callable[[], Any],
    params: Sequence[Tensor],
    source: NoiseSource,
    options: Any,
    grad_output: Tensor | float = 1.0,
    f0: Tensor | None = None,
    whole: set[int] | None = None,
) -> tuple[list[Tensor], set[int]]:
    """The module API's estimate at inference memory (``.grad`` path): see the module docstring.

    Args:
        module: The module.
        forward: Runs the module's forward on the call's inputs and returns the scalar.
        params: The trainable parameters (distinct).
        source: The noise source.
        options: The `EstimatorOptions`.
        grad_output: The incoming gradient.
        f0: The unperturbed value (``forward`` method only).
        whole: Parameter indices perturbed for the whole evaluation from the start.

    Returns:
        One gradient per parameter (in its dtype), and the indices of the parameters perturbed for the whole
        evaluation (``whole`` and those found read outside their owner's forward).
    """
    from .gradient import _finish, check_sigma_resolution

    params = list(params)
    check_sigma_resolution(params, [None] * len(params), options.sigma)
    noise = MemberNoise(source)
    noise.start(params)
    device = params[0].device
    dtype = value_dtype_of(params)
    g = torch.as_tensor(grad_output, dtype=dtype).to(device)
    with ModulePerturbation(module, params, noise, whole) as perturbation:
        first = [True]

        def evaluate(k: int, c: float) -> Any:
            detect, first[0] = first[0], False
            return perturbation.evaluate(k, c, forward, detect=detect)

        weights, _, finite = member_weights(evaluate, options, f0, device, dtype)
    grads = accumulate(params, noise, weights * g)
    return _finish(grads, params, finite, g), perturbation.whole
