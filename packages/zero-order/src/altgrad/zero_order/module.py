"""``ZeroOrderGradientModule``: TorchOpt's OOP zero-order API, batched.

Subclass it with class keywords, implement ``forward`` (returning a scalar) and ``sample``::

    class Net(ZeroOrderGradientModule, method="antithetic", num_samples=100, sigma=0.01):
        def forward(self, x, y): ...
        def sample(self, sample_shape=torch.Size()): ...

Calling the module returns the unperturbed loss; its backward estimates gradients for every parameter with
``requires_grad=True`` (frozen parameters are neither perturbed nor given a gradient). The population is evaluated
with ``torch.func.functional_call`` under ``torch.func.vmap`` over stacked perturbed parameters, in chunks. On the
CPU, the dense-perturbed weight and bias of an ``nn.Linear`` that no other code reads (checked on the unperturbed
forward of each call) are not stacked: the layer runs ``altgrad.es_layers.functional.perturbed_linear`` on the
chunk's members with their noise (see `_DenseLinear`).
"""

from __future__ import annotations

import abc
import collections
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

import altgrad.es_layers.functional as EF

from . import inference
from ._noise import NoiseSource
from ._reads import ValueReads
from .directions import Dense, Direction, Flipout, LowRank, Workspace
from .distributions import Samplable, SeededDistribution
from .gradient import EstimatorOptions, check_distributed_source, default_plans, run_estimate
from .population import PopulationEvaluator, check_output

__all__ = ["ZeroOrderGradientModule", "enable_zero_order_gradients"]

_ORIGINAL = "__zero_order_original_forward__"
_CLASS_KEYWORDS = (
    "method",
    "num_samples",
    "sigma",
    "chunk_size",
    "batching",
    "top_k",
    "sample_batched",
    "directions",
    "rank",
    "process_group",
    "memory",
)


class ZeroOrder(torch.autograd.Function):
    """Autograd node of one module call: forward is the plain forward, backward the zero-order estimate."""

    @staticmethod
    def forward(ctx: Any, call: _ModuleCall, *flat_params: Tensor) -> Tensor:
        output = check_output(call.center())
        if any(output is p for p in flat_params):
            output = output.clone()
        ctx.call = call
        ctx.save_for_backward(*flat_params, output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        *flat_params, f0 = ctx.saved_tensors
        grads = ctx.call.estimate(flat_params, grad_output, f0)
        return (None, *grads)


def _linear_weights(module: nn.Module, names: Sequence[str]) -> dict[int, nn.Linear]:
    """Index in ``names`` -> the plain ``nn.Linear`` whose ``weight`` that name is.

    Plain: its forward is ``nn.Linear.forward``, neither overridden by a subclass nor replaced on the instance
    (accelerate's hooks set ``layer.forward``; such a layer takes the general path and its attribute is kept).
    """
    modules = dict(module.named_modules())
    found: dict[int, nn.Linear] = {}
    for i, name in enumerate(names):
        owner_name, _, attr = name.rpartition(".")
        owner = modules.get(owner_name)
        if (
            attr == "weight"
            and isinstance(owner, nn.Linear)
            and type(owner).forward is nn.Linear.forward
            and "forward" not in owner.__dict__
        ):
            found[i] = owner
    return found


def _slots(module: nn.Module, names: Sequence[str], params: Sequence[Tensor]) -> list[list[str]]:
    """Per trainable parameter, the name of every distinct ``(module object, attribute)`` slot holding it.

    ``torch.func.functional_call`` swaps a value in by name and restores it afterwards; a module registered under
    two names (``self.again = self.block``) is one object reached by two names, and swapping both names leaves
    the substitute in place of the Parameter. One name per slot, with ``tie_weights=False``, swaps every place
    the parameter lives exactly once (a parameter held by two different modules has two slots).
    """
    index = {id(p): i for i, p in enumerate(params)}
    slots: list[list[str]] = [[] for _ in names]
    seen: set[tuple[int, str]] = set()
    for prefix, m in module.named_modules(remove_duplicate=False):
        for attr, t in m._parameters.items():
            if t is None or id(t) not in index or (id(m), attr) in seen:
                continue
            seen.add((id(m), attr))
            slots[index[id(t)]].append(f"{prefix}.{attr}" if prefix else attr)
    return slots


class _ModuleCall:
    def __init__(
        self,
        module: ZeroOrderGradientModule,
        forward: Callable[..., Tensor],
        names: list[str],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: EstimatorOptions,
    ) -> None:
        self.module, self.forward, self.names = module, forward, names
        self.args, self.kwargs, self.options = args, kwargs, options
        # ids of the nn.Linear layers whose weight and bias only their forward uses (see `center`)
        self.layer_only: set[int] = set()
        # weight leaf -> (layer, its direction, the deferred plan of its bias when the layer perturbs it)
        self.factored: dict[int, tuple[nn.Linear, Direction, Dense | None]] = {}
        self.layer_biases: set[int] = set()  # bias leaves perturbed by their layer (fast path)
        self.slots: list[list[str]] = [[name] for name in names]  # set by `estimate` (see `_slots`)

    def center(self) -> Any:
        """The unperturbed forward; it also finds the ``nn.Linear`` layers whose weight and bias no other code
        reads and no other module holds (a parameter used elsewhere must be perturbed everywhere, so such a layer
        is not given the fast path)."""
        layers = list(
            {id(owner): owner for owner in _linear_weights(self.module, self.names).values()}.values()
        )
        if not layers or self.options.memory == "inference":  # the inference mode has no fast path to plan
            with _active(self.module):
                return self.forward(self.module, *self.args, **self.kwargs)
        watch = ValueReads(
            {id(t): id(t) for layer in layers for t in (layer.weight, layer.bias) if t is not None}
        )
        for layer in layers:
            layer.forward = functools.partial(_trusted_forward, layer, watch)  # type: ignore[method-assign]
        try:
            with _active(self.module), watch:
                return self.forward(self.module, *self.args, **self.kwargs)
        finally:
            for layer in layers:
                del layer.forward
            # a parameter held by two modules (tied) is perturbed by functional_call in both, never by one layer
            holders = collections.Counter(
                id(t) for m in self.module.modules() for t in m._parameters.values() if t is not None
            )
            self.layer_only = {
                id(layer)
                for layer in layers
                if not any(
                    t is not None and (id(t) in watch.found or holders[id(t)] > 1)
                    for t in (layer.weight, layer.bias)
                )
            }

    def _plans(self, params: Sequence[Tensor]) -> list[Direction]:
        """Dense directions, or low-rank ones; for ``nn.Linear`` weights the noise goes straight to the layer.

        A dense-perturbed CPU ``nn.Linear`` whose weight and bias only its forward reads gets both noises
        (deferred `Dense` plans) and runs ``es_layers.functional.perturbed_linear``; structured directions hand
        the layer their factors.
        """
        plans = default_plans(self.options, params)
        self.factored, self.layer_biases = {}, set()
        index = {name: i for i, name in enumerate(self.names)}
        for i, owner in _linear_weights(self.module, self.names).items():
            if isinstance(plans[i], Dense):
                p = params[i]
                prefix = self.names[i].rpartition(".")[0]
                j = index.get(f"{prefix}.bias" if prefix else "bias")
                bias = owner.bias
                if (
                    p.device.type == "cpu"
                    and p.dtype in (torch.float32, torch.float64)
                    and id(owner) in self.layer_only
                    and (bias is None or bias.dtype == p.dtype)
                    and (bias is None or not bias.requires_grad or j is not None)  # a trainable bias is ours
                ):
                    bias_plan = None
                    if j is not None:
                        plans[j] = bias_plan = Dense(j, deferred=True)
                        self.layer_biases.add(j)
                    plans[i] = Dense(i, deferred=True)
                    self.factored[i] = (owner, plans[i], bias_plan)
                continue
            if id(owner) not in self.layer_only:  # another use of the weight must see the same perturbation
                continue
            if self.options.directions == "lowrank":
                plans[i] = LowRank(i, len(params), self.options.rank, factored=True)
            else:
                plans[i] = Flipout(i, len(params), factored=True)
            self.factored[i] = (owner, plans[i], None)
        return plans

    def _call_with(self, *inputs: Tensor) -> Tensor:
        dense: dict[str, Tensor] = {}
        patched: list[nn.Linear] = []
        it = iter(inputs)
        try:
            for i in range(len(self.names)):
                if i in self.layer_biases:  # its layer adds the bias noise itself
                    next(it)
                    continue
                entry = self.factored.get(i)
                if entry is None:
                    value = next(it)
                    for slot in self.slots[i]:
                        dense[slot] = value
                    continue
                layer, plan, bias_plan = entry
                if isinstance(plan, Dense):
                    layer.forward = functools.partial(_dense_forward, layer, plan, bias_plan, next(it))  # type: ignore[method-assign]
                    patched.append(layer)
                    continue
                first, second = next(it), next(it)
                layer.forward = _factored_forward(layer, plan, first, second)  # type: ignore[method-assign,assignment]
                patched.append(layer)
            with _active(self.module):
                return torch.func.functional_call(
                    self.module, dense, self.args, self.kwargs, strict=False, tie_weights=False
                )
        finally:
            for layer in patched:
                del layer.forward

    def estimate(self, params: Sequence[Tensor], grad_output: Tensor, f0: Tensor) -> list[Tensor]:
        with _lock(self.module):
            return self._estimate(params, grad_output, f0)

    def _estimate(self, params: Sequence[Tensor], grad_output: Tensor, f0: Tensor) -> list[Tensor]:
        module = self.module
        cache = module.__dict__.setdefault("_zero_order_batching", {})
        evaluator = PopulationEvaluator(self._call_with, self.options.batching)
        evaluator.resolved = cache.get(type(module), evaluator.resolved)
        distribution = getattr(module, "zero_order_distribution", None)
        distribution = distribution() if distribution is not None else module.sample
        source = NoiseSource(distribution, sample_batched=self.options.sample_batched)
        check_distributed_source(source, self.options)
        f0_arg = f0 if self.options.method == "forward" else None
        if self.options.memory == "inference":
            return _estimate_inference(self, params, source, grad_output, f0_arg)
        plans = self._plans(params)
        self.slots = _slots(module, self.names, params)
        workspace = module.__dict__.setdefault("_zero_order_workspace", Workspace())
        try:
            with _population_buffers(module):
                grads = run_estimate(
                    evaluator, list(params), source, self.options, grad_output, f0_arg, plans, workspace
                )
        finally:
            for plan in plans:  # the chunk's noise is not kept alive by the autograd graph
                if isinstance(plan, Dense):
                    plan.pending, plan.workspace = None, None
        if self.options.batching == "auto" and evaluator.resolved is not None:
            cache[type(module)] = evaluator.resolved
        return grads


def _estimate_inference(
    call: _ModuleCall, params: Sequence[Tensor], source: NoiseSource, grad_output: Tensor, f0: Tensor | None
) -> list[Tensor]:
    """``memory="inference"``: members one at a time, each layer perturbed inside its own forward (`inference`).

    The module's own parameters are perturbed for the whole evaluation (its forward is called directly, not through
    hooks), as are those found read outside their owner's forward in an earlier estimate (remembered per module)."""
    module = call.module
    outside: set[int] = module.__dict__.setdefault("_zero_order_outside_reads", set())
    whole = inference.trainable_owned_by(module, params) | {
        j for j, p in enumerate(params) if id(p) in outside
    }

    def forward() -> Any:
        with _active(module):
            return call.forward(module, *call.args, **call.kwargs)

    with _population_buffers(module), source.step_on_success():
        grads, found = inference.run_module(
            module, forward, list(params), source, call.options, grad_output, f0, whole
        )
    outside.update(id(params[j]) for j in found)
    return grads


def _trusted_forward(layer: nn.Linear, watch: ValueReads, input: Tensor) -> Tensor:
    """``nn.Linear.forward`` of ``layer`` during the unperturbed forward: its own use of the weight is not counted.
    The argument is named ``input`` as in ``nn.Linear.forward`` (``layer(input=x)`` works)."""
    watch.paused += 1
    try:
        return torch.nn.functional.linear(input, layer.weight, layer.bias)
    finally:
        watch.paused -= 1


class _DenseLinear(torch.autograd.Function):
    """An ``nn.Linear`` with dense-perturbed weight and bias: member ``k`` computes
    ``F.linear(x, W ± σ z_k, b ± σ ζ_k)``.

    The member's input is its row ``k`` of the chunk (rows ``< n`` take ``+σ``, the others ``-σ`` with
    ``k - n``): the chunk's layout is es-layers' population layout with ``R = 2`` antithetic repeats (or ``R = 1``),
    so under ``vmap`` the batching rule is ``es_layers.functional.perturbed_linear``, which never writes all
    perturbed weights to memory (a shared input, the first layer's batch, is multiplied once by ``W`` and once by
    every ``z_k``; per-member inputs by ``W ± σ z_k`` built a few members at a time, in the cache). The output goes
    to the module's workspace (`_layer_output`). Outside ``vmap`` (the loop fallback) it is ``F.linear``. Used under
    ``no_grad`` only (population evaluations), so no backward is defined.
    """

    @staticmethod
    def forward(
        x: Tensor, row: Tensor, weight: Tensor, bias: Tensor | None, plan: Dense, bias_plan: Dense | None
    ) -> Tensor:
        assert plan.pending is not None
        p, z, sigma = plan.pending
        k, n = int(row), z.shape[0]
        c = sigma if k < n else -sigma
        if bias_plan is not None:
            assert bias is not None
            assert bias_plan.pending is not None
            bias = torch.add(bias, bias_plan.pending[1][k % n], alpha=c)
        return torch.nn.functional.linear(x, torch.add(p, z[k % n], alpha=c), bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        x: Tensor,
        row: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        plan: Dense,
        bias_plan: Dense | None,
    ) -> tuple[Tensor, int]:
        assert plan.pending is not None  # set by Dense.inputs for this chunk
        # the member rows are batched; weight and bias (never substituted) are not
        assert in_dims[1] == 0
        assert in_dims[2] is None
        assert in_dims[3] is None
        p, z, sigma = plan.pending
        m = info.batch_size
        x = x.expand(m, *x.shape) if in_dims[0] is None else x.movedim(in_dims[0], 0)
        noise_b = None if bias_plan is None or bias_plan.pending is None else bias_plan.pending[1]
        out = _layer_output(plan, (*x.shape[:-1], p.shape[0]), p)
        EF.perturbed_linear(x, p, bias, z, noise_b, sigma=sigma, antithetic=m > z.shape[0], out=out)
        return out, 0


def _layer_output(plan: Dense, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The output tensor of this call of a dense-perturbed layer, kept in the estimate's workspace between chunks
    and estimates: fresh large tensors are new pages from the OS on every call (on the MLP benchmark about 10,000
    page faults, some 10 ms, per estimate without this). Keyed by the layer's call number within the chunk's
    evaluation, so a layer called twice in one forward never overwrites its first output; the values the
    estimator keeps are copies (`run_estimate`), so nothing outlives the evaluation that wrote it. Only the first
    call's output is kept: a layer called T times (an RNN cell) keeps one buffer, not T."""
    call = plan.calls
    plan.calls += 1
    if plan.workspace is None or call > 0:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return plan.workspace.scratch((plan.leaf, call, "out"), shape, like.dtype, like.device)


def _dense_forward(
    layer: nn.Linear,
    plan: Dense,
    bias_plan: Dense | None,
    row: Tensor,
    input: Tensor,
) -> Tensor:
    """``layer.forward`` of a member during population evaluations (see `_DenseLinear`)."""
    return _DenseLinear.apply(input, row, layer.weight, layer.bias, plan, bias_plan)  # type: ignore[no-any-return]


def _factored_forward(
    layer: nn.Linear, plan: Direction, first: Tensor, second: Tensor
) -> Callable[[Tensor], Tensor]:
    """One member's ``nn.Linear`` forward with a factored perturbation, computed by ``altgrad.es_layers.functional``
    (``lowrank_linear``: ``x Wᵀ + (x B)(σA/√r)ᵀ``; ``flipout_linear``: ``x Wᵀ + ((x ∘ s) (σS)ᵀ) ∘ r``), never
    forming ``W + σE``. Under ``vmap`` the member is a population of one (``n = 1``, the batch rows as repeats)."""

    def forward(input: Tensor) -> Tensor:
        x = input
        # A zero bias with the member's batch dimension keeps the output batched under vmap even when the input
        # and the bias are shared by all members (the functional forwards add their term in place).
        zero = torch.zeros_like(first) if isinstance(plan, Flipout) else torch.zeros_like(first[:, 0])
        bias = zero if layer.bias is None else layer.bias + zero
        flat = x.reshape(1, -1) if x.dim() == 1 else x
        if isinstance(plan, Flipout):
            assert plan.shared is not None
            out = EF.flipout_linear(
                flat, layer.weight, bias, plan.shared, second.unsqueeze(0), first.unsqueeze(0)
            )
        else:
            out = EF.lowrank_linear(flat, layer.weight, bias, first.unsqueeze(0), second.unsqueeze(0))
        return out.reshape(layer.out_features) if x.dim() == 1 else out

    return forward


class _population_buffers:
    """Population evaluations leave the module's buffers untouched.

    Batch-norm layers in training mode that track running statistics are evaluated without them (each member
    normalises with its own batch statistics, as in the plain training forward, and nothing is updated; this also
    lets ``vmap`` run them). Every other buffer is snapshotted and restored afterwards, so in-place buffer updates
    by perturbed members, or by a failed ``vmap`` attempt, leave no trace. The unperturbed forward of the call (the
    returned loss) is the only one that updates buffers: one update per estimate, as a plain forward.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.detached: list[tuple[nn.Module, str, Tensor | None]] = []
        self.saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []

    def __enter__(self) -> None:
        for m in self.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    self.detached.append((m, name, m._buffers.get(name)))
                    m._buffers[name] = None
        self.saved = [
            (m, name, b, b.detach().clone())
            for m in self.module.modules()
            for name, b in m._buffers.items()
            if b is not None
        ]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for m, name, buffer, copy in self.saved:
                m._buffers[name] = buffer
                buffer.copy_(copy)
        for m, name, detached in self.detached:
            m._buffers[name] = detached


_LOCKS_GUARD = threading.Lock()


def _lock(module: nn.Module) -> Any:
    """The module's re-entrant lock: one call (forward or estimate) at a time per module.

    A call patches the forwards of its ``nn.Linear`` layers, swaps parameters in (``functional_call``) and reuses
    the module's workspace, all on the shared module, so calls from two threads are serialised (a thread waits
    for the other's call to end); the same thread re-enters (members call the module's forward).
    """
    lock = module.__dict__.get("_zero_order_lock")
    if lock is None:
        with _LOCKS_GUARD:
            lock = module.__dict__.setdefault("_zero_order_lock", threading.RLock())
    return lock


class _active:
    """While active, the wrapped ``forward`` of ``module`` runs the user's forward directly (no new estimate)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.__dict__["_zero_order_depth"] = self.module.__dict__.get("_zero_order_depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        self.module.__dict__["_zero_order_depth"] -= 1


def _make_forward(original: Callable[..., Tensor], options: EstimatorOptions) -> Callable[..., Tensor]:
    @functools.wraps(original)
    def forward(self: ZeroOrderGradientModule, *args: Any, **kwargs: Any) -> Tensor:
        with _lock(self):  # the depth below is this thread's: another thread's call waits for the lock
            return _call(self, *args, **kwargs)

    def _call(self: ZeroOrderGradientModule, *args: Any, **kwargs: Any) -> Tensor:
        if self.__dict__.get("_zero_order_depth", 0):
            return original(self, *args, **kwargs)
        named = list(self.named_parameters())
        if not named:
            raise RuntimeError("The module has no parameters.")
        trainable = [(name, p) for name, p in named if p.requires_grad]
        if not trainable:
            with _active(self):
                return original(self, *args, **kwargs)
        names = [name for name, _ in trainable]
        call = _ModuleCall(self, original, names, args, kwargs, options)
        return ZeroOrder.apply(call, *(p for _, p in trainable))

    setattr(forward, _ORIGINAL, original)
    forward.__zero_order_gradients_enabled__ = True  # type: ignore[attr-defined]
    return forward


def enable_zero_order_gradients(
    cls: type[nn.Module],
    method: str = "naive",
    num_samples: int = 1,
    sigma: float = 1.0,
    **options: Any,
) -> type[nn.Module]:
    """Replace ``cls.forward`` by a zero-order estimating wrapper (TorchOpt's function of the same name).

    ``cls`` is a module class with ``forward`` (returning a scalar) and ``sample(sample_shape)``. The class
    keywords of `ZeroOrderGradientModule` do this for you; this function is the building block TorchOpt exposes
    as ``torchopt.diff.zero_order.nn.module.enable_zero_order_gradients``.

    Args:
        cls: The module class to modify (in place).
        method: Estimator name (see `zero_order`).
        num_samples: Number of directions N.
        sigma: Perturbation scale σ.
        **options: Further estimator keywords (``chunk_size``, ``batching``, ``top_k``, ``sample_batched``,
            ``directions``, ``rank``, ``process_group``).

    Returns:
        ``cls`` itself.

    Raises:
        TypeError: ``'Zero-order gradient estimation is already enabled for the `forward` method.'`` when
            ``cls.forward`` is already wrapped (as TorchOpt), or ``cls`` is not an ``nn.Module`` subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be a subclass of torch.nn.Module, got {cls!r}")
    forward = cls.forward
    if getattr(forward, "__zero_order_gradients_enabled__", False):
        raise TypeError("Zero-order gradient estimation is already enabled for the `forward` method.")
    settings = EstimatorOptions(method=method, num_samples=num_samples, sigma=sigma, **options)
    cls.forward = _make_forward(forward, settings)  # type: ignore[method-assign]
    return cls


class ZeroOrderGradientModule(nn.Module, Samplable):
    """Base class for modules whose gradients are estimated by zero-order (ES) methods.

    Drop-in for ``torchopt.nn.ZeroOrderGradientModule``. Class keywords (all optional) configure the estimator and
    are inherited by further subclasses, which may override any of them:

    - ``method``: ``"naive"`` (default), ``"forward"``, ``"antithetic"``, ``"es"`` or ``"ars"``;
    - ``num_samples``: number of directions N (default 1);
    - ``sigma``: perturbation scale σ (default 1.0);
    - ``process_group``: a ``torch.distributed`` process group to shard the population over (needs a seeded
      distribution from `zero_order_distribution`); since a group exists only after ``init_process_group``,
      set it on a subclass defined then: ``class DistNet(Net, process_group=dist.group.WORLD): pass``;
    - ``memory``: ``"batched"`` (default) or ``"inference"``: members evaluated one after another, each layer's
      trainable parameters perturbed only during that layer's forward, directions regenerated from their seed,
      parameters never written (memory about one inference pass; see `inference`);
    - ``chunk_size``, ``batching``, ``top_k``, ``sample_batched``, ``directions``, ``rank``: as in
      `zero_order`. With ``directions="lowrank"`` the weights of ``nn.Linear``
      submodules are perturbed by ``σ A Bᵀ/√r`` *without materialising it*: the layer computes
      ``x Wᵀ + (x B)(σA/√r)ᵀ``, so the population forward costs about one plain forward over all rows (this
      assumes such a weight is only used through its layer's ``forward``).

    Subclasses implement ``forward(*args, **kwargs)`` returning a scalar tensor and ``sample(sample_shape)``
    returning noise of that shape (zero mean, unit variance per element; all members of a chunk are requested at
    once as ``sample_shape=(n, *param.shape)``). Differences from TorchOpt that break no TorchOpt code:
    ``forward`` may take keyword arguments, sub-subclasses work, and parameters with ``requires_grad=False``
    are not perturbed.

    Raises:
        RuntimeError: ``'The module has no parameters.'`` when called on a module without parameters.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from altgrad.zero_order import ZeroOrderGradientModule
        >>> class Net(ZeroOrderGradientModule, method="antithetic", num_samples=50, sigma=0.01):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(4, 1)
        ...     def forward(self, x, y):
        ...         return F.mse_loss(self.fc(x), y)
        ...     def sample(self, sample_shape=torch.Size()):
        ...         return torch.randn(sample_shape)
        >>> net = Net()
        >>> net(torch.randn(8, 4), y=torch.randn(8, 1)).backward()
        >>> net.fc.weight.grad.shape
        torch.Size([1, 4])
    """

    _zero_order_options: ClassVar[EstimatorOptions] = EstimatorOptions()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Configure the estimator from the class keywords and wrap ``forward``.

        Args:
            **kwargs: The estimator keywords listed in the class docstring; others go to ``super()``.
        """
        keywords = {k: kwargs.pop(k) for k in _CLASS_KEYWORDS if k in kwargs}
        super().__init_subclass__(**kwargs)
        parent = cls._zero_order_options
        values = {k: getattr(parent, k) for k in _CLASS_KEYWORDS}
        values.update(keywords)
        cls._zero_order_options = options = EstimatorOptions(**values)
        forward = cls.__dict__.get("forward")
        if forward is None:
            inherited = cls.forward
            original = getattr(inherited, _ORIGINAL, None)
            if original is None or not keywords:
                return  # abstract or already wrapped with the same settings
            forward = original
        elif hasattr(forward, _ORIGINAL):
            forward = getattr(forward, _ORIGINAL)
        if getattr(forward, "__isabstractmethod__", False):
            return
        cls.forward = _make_forward(forward, options)  # type: ignore[method-assign]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the reusable buffers of perturbed parameters (``torch.save`` of the whole module)."""
        state = super().__getstate__()
        state = dict(state)
        state.pop("_zero_order_workspace", None)
        state.pop("_zero_order_lock", None)
        return state

    def get_extra_state(self) -> dict[str, Any]:
        """The noise position, saved in ``state_dict()`` (under ``_extra_state``).

        With a seeded `zero_order_distribution` it holds the distribution's seed and step, so a run resumed from a
        checkpoint (even in a new process, loaded with ``weights_only=True``) draws the directions the uninterrupted
        run would have drawn. Empty for other distributions (they draw from torch's global RNG, which a checkpoint
        must save itself: ``torch.get_rng_state()``).

        Returns:
            ``{"distribution": {"seed": ..., "step": ...}}`` or ``{}``.
        """
        distribution = self.zero_order_distribution()
        if isinstance(distribution, SeededDistribution):
            return {"distribution": distribution.state_dict()}
        return {}

    def set_extra_state(self, state: Any) -> None:
        """Restore the noise position saved by `get_extra_state` (called by ``load_state_dict``).

        Args:
            state: What `get_extra_state` returned.

        Raises:
            TypeError: If ``state`` is not a dict, or it holds a seeded distribution's position while
                `zero_order_distribution` returns another kind of distribution.
        """
        if not isinstance(state, dict):
            raise TypeError(
                f"the extra state of {type(self).__name__} must be a dict, got {type(state).__name__}"
            )
        saved = state.get("distribution")
        if saved is None:
            return
        distribution = self.zero_order_distribution()
        if not isinstance(distribution, SeededDistribution):
            raise TypeError(
                "the state holds the position of a seeded distribution, but zero_order_distribution() returns "
                f"{type(distribution).__name__}"
            )
        distribution.load_state_dict(saved)

    def zero_order_release_workspace(self) -> None:
        """Free the buffers of perturbed parameters kept between estimates (at most one chunk, see `zero_order`).

        They are allocated again by the next estimate.
        """
        self.__dict__.pop("_zero_order_workspace", None)

    def zero_order_distribution(self) -> Any:
        """The distribution the estimator draws from; by default the module's own `sample`.

        Override it to return a seeded distribution (for example a `SeededNormal` kept
        as an attribute) for regenerable, reproducible noise that never touches the global RNG.

        Returns:
            A Samplable, a callable ``fn(sample_shape)`` or a seeded distribution.
        """
        return self.sample

    @abc.abstractmethod
    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Compute the scalar objective.

        Args:
            *args: Positional inputs.
            **kwargs: Keyword inputs.

        Returns:
            A scalar tensor.
        """
        raise NotImplementedError

    @abc.abstractmethod
    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor | Sequence[float]:  # noqa: B008
        """Sample noise of shape ``sample_shape`` (zero mean, unit variance per element).

        Args:
            sample_shape: Shape of the requested sample.

        Returns:
            A tensor of shape ``sample_shape``.
        """
        raise NotImplementedError
