r"""`ZOSGD`: MeZO's zero-order SGD as an optimizer, at inference memory and without ``.grad``.

One step evaluates the closure at ``θ ± σz_k`` for each direction (members one after another, each layer perturbed
only inside its own forward, see `inference`), computes the weights ``w_k`` of the estimator (antithetic:
``(f⁺_k − f⁻_k) / (2σN)``, MeZO's projected gradient for N = 1), then draws every ``z_k`` again and steps each
parameter in place: ``θ ← θ − lr·(Σ_k w_k z_k + weight_decay·θ)``. No gradient tensor is ever allocated. For half
precision parameters the step is formed in float32 and rounded once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from . import inference
from ._noise import NoiseSource, compute_dtype
from .gradient import EstimatorOptions, check_sigma_resolution
from .module import _population_buffers

__all__ = ["ZOSGD"]

#: `ZOSGD` warns when σ is below the parameters' resolution (`SigmaResolutionWarning`) on its first step and then
#: every this many steps (the parameters move slowly; the check reads every parameter).
SIGMA_CHECK_EVERY = 100


class ZOSGD(torch.optim.Optimizer):
    r"""Zero-order SGD (MeZO's ZO-SGD) over the trainable parameters of ``module``; needs no ``.grad``.

    ``step(closure)`` calls ``closure()`` (which runs ``module`` and returns a scalar loss) once per member under
    ``torch.no_grad()``, with member ``k``'s perturbation ``±σz_k`` visible to the module's forward, then updates
    the parameters in place. Parameters are never written during the evaluations (no MeZO drift), only by the
    update. Frozen parameters (``requires_grad=False`` when the optimizer is built) are neither perturbed nor
    updated, so on a peft LoRA model only the adapters train. Learning-rate schedulers work on ``param_groups``.

    Args:
        module: The model the closure runs (its submodules' forwards see the perturbation).
        lr: Learning rate (> 0).
        sigma: Perturbation scale σ (> 0; MeZO's ε).
        num_samples: Directions N per step (antithetic methods evaluate 2N members).
        method: Estimator (see `zero_order`); ``"antithetic"`` is MeZO's two-sided SPSA.
        distribution: Noise distribution (default ``torch.distributions.Normal(0, 1)``, drawn under per-member
            seeds from torch's RNG); a seeded distribution (`SeededNormal`) gives the batched mode's directions.
        weight_decay: Decoupled from the estimate: ``θ ← θ − lr·wd·θ`` each step (MeZO's form).
        top_k: Directions kept by ``method="ars"``.

    Raises:
        TypeError: If ``module`` is not an ``nn.Module``.
        ValueError: For non-positive ``lr``, a negative ``weight_decay``, no trainable parameter, or invalid
            estimator settings.

    Example:
        >>> import torch
        >>> from altgrad.zero_order import ZOSGD
        >>> net = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> opt = ZOSGD(net, lr=0.05, sigma=1e-3, num_samples=4)
        >>> loss = opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))
        >>> net.weight.grad is None
        True
    """

    def __init__(
        self,
        module: nn.Module,
        lr: float = 1e-3,
        *,
        sigma: float = 1e-3,
        num_samples: int = 1,
        method: str = "antithetic",
        distribution: Any = None,
        weight_decay: float = 0.0,
        top_k: int | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("`module` has no parameter with requires_grad=True to optimise")
        self.options = EstimatorOptions(
            method=method, num_samples=num_samples, sigma=sigma, top_k=top_k, memory="inference"
        )
        if distribution is None:
            distribution = torch.distributions.Normal(0.0, 1.0)
        self.source = NoiseSource(distribution)
        self.module = module
        self._whole: set[int] = set()  # ids of parameters read outside their owner's forward (found earlier)
        #: The weights ``w_k`` of the last step (MeZO's projected gradient for N = 1), shape ``(N,)``.
        self.projected_grad: Tensor | None = None
        self._steps = 0
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One ZO-SGD step.

        Args:
            closure: Runs the module on the batch and returns the scalar loss (called 2N times for antithetic
                methods, N for ``naive``, N + 1 for ``forward``).

        Returns:
            The loss: the unperturbed value for ``forward``, otherwise the mean over the members (for
            ``antithetic`` an estimate of f(θ) with an O(σ²) bias).

        Raises:
            ValueError: Without a closure, or with a parameter (added by ``add_param_group``) that ``module`` does
                not hold.
        """
        if closure is None:
            raise ValueError("ZOSGD.step needs a `closure` that runs the module and returns the scalar loss")
        params = [p for group in self.param_groups for p in group["params"]]
        rates = [(group["lr"], group["weight_decay"]) for group in self.param_groups for _ in group["params"]]
        options = self.options
        if self._steps % SIGMA_CHECK_EVERY == 0:  # a reduction over every parameter: not on every step
            check_sigma_resolution(params, [None] * len(params), options.sigma)
        self._steps += 1
        noise = inference.MemberNoise(self.source)
        noise.start(params)
        device = params[0].device
        dtype = inference.value_dtype_of(params)
        f0 = None
        if options.method == "forward":
            f0 = inference._value(closure(), device, dtype)
        whole = {j for j, p in enumerate(params) if id(p) in self._whole}
        with inference.ModulePerturbation(self.module, params, noise, whole) as perturbation:
            first = [True]

            def evaluate(k: int, c: float) -> Any:
                detect, first[0] = first[0], False
                return perturbation.evaluate(k, c, closure, detect=detect)

            with _population_buffers(self.module):
                weights, values, finite = inference.member_weights(evaluate, options, f0, device, dtype)
        self._whole.update(id(params[j]) for j in perturbation.whole)
        self.projected_grad = weights
        loss = f0 if f0 is not None else values.mean()
        if not bool(finite):
            warnings.warn(
                "ZOSGD: a member's loss is not finite; the parameters were left unchanged this step",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        w = weights.tolist()
        for j, (p, (lr, wd)) in enumerate(zip(params, rates)):
            work = p if p.dtype == compute_dtype(p.dtype) else p.to(compute_dtype(p.dtype))
            if wd:
                work.mul_(1.0 - lr * wd)
            for k, wk in enumerate(w):
                z, _ = noise.direction(j, k, p)
                work.add_(z, alpha=-lr * wk)
                del z  # freed before the next draw: one direction alive at a time, not two
            if work is not p:
                p.copy_(work)
        return loss
