"""A decoupled pipeline on ``torch.distributed``: one stage per process, updated from synthetic gradients.

Stage ``k`` of ``K`` runs in process (group rank) ``k``. For every batch ``t`` it

1. receives its input ``h_{k-1}(t)`` from stage ``k-1`` (stage 0 reads the batch itself),
2. computes ``h_k(t)``, back-propagates its synthesizer's prediction ``ŝ = M_k(h_k(t)[, y])`` into itself and
   steps its optimizer at once (update unlocking, as :class:`~altgrad.dni.DNI` does in one process),
3. sends ``h_k(t)`` on to stage ``k+1`` (non-blocking) and sends the gradient that arrived at its own input,
   ``∂/∂h_{k-1}``, back to stage ``k-1``: the last stage's is the true loss gradient, a middle stage's is its
   synthetic gradient back-propagated through it (bootstrapped, as with stacked interfaces in one process),
4. goes on to the next batch. The gradient for ``h_k(t)`` comes back from stage ``k+1`` later; it is the
   regression target of ``M_k``, which is trained on it (prediction recomputed from the kept ``h_k(t)``) before
   the forward of batch ``t + 1 + staleness``.

``staleness=s`` bounds how far a stage runs ahead: at the forward of batch ``t`` stage ``k``'s synthesizer has
been trained on the targets of every batch up to ``t - 1 - s``, so a stage is at most ``s + 1`` batches ahead
of the next one. ``staleness=0`` is exactly the single-process wrapper's schedule (no overlap: a check of the
semantics); ``staleness >= 1`` lets the stages overlap. The maths (synthesizer loss, gradient mix) is
:mod:`altgrad.dni._functional`'s and the synthesizer sits in a :class:`~altgrad.dni.BackwardInterface`, as in
one process.

Every message is a small header (status, batch index, shape) then the tensor's bytes. Neighbours on one host
with CPU stages exchange them over a Unix socket (``transport="socket"``, the default where it can connect:
about 40 µs a message of 64 KiB one way, against 150 µs through gloo); others through the process group's
``isend`` / ``irecv`` (gloo, NCCL). A stage that fails sends its neighbours a *failure* header instead of data:
they raise :class:`PipelineError` naming the failing stage and pass the failure on; a stage whose process dies
closes its connections, which its neighbours see at once. The first failure's text is kept in the process
group's store, so every rank reports the stage that failed.

Forward unlocking (``synthetic_inputs``, paper §3.3): a stage ``k >= 1`` with it does not wait for
``h_{k-1}(t)``. It predicts its input ``ĥ_{k-1}(t) = I_k(x(t)[, y(t)])`` from the batch's inputs ``x`` (flattened
to ``(B, -1)``; every rank reads the same batches) and, with ``context_size``, the labels, runs forward, backward
and its optimizer step on ``ĥ`` at once and sends the gradient at ``ĥ`` back to stage ``k-1`` (the target of
``M_{k-1}``). The real ``h_{k-1}(t)`` still comes from stage ``k-1``; it only trains ``I_k`` (a
:class:`~altgrad.dni.ForwardInterface`, regression ``‖ĥ − h‖² / B`` on a recomputed prediction), before the
forward of batch ``t + 1 + staleness``. No step is taken on the real input: as in the paper's complete unlock and
the single-process wrapper, the layers above a cut train on synthetic inputs only.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._functional import mix_gradient, sg_loss_grad
from ._links import GroupLink, SocketLink, connect_socket
from ._optim import optimizer_factory, update
from .forward import ForwardInterface
from .interface import BackwardInterface, one_hot_labels, run_backward
from .synthesizers import LinearDNI
from .wrapper import _SHAPE_PRESERVING, _infer_features, check_feature_dim, check_synthesizer_fits

__all__ = ["DecoupledPipeline", "PipelineError", "split_sequential"]

_TRANSPORTS = ("auto", "socket", "process_group")
# every rank builds its pipelines on a group in the same order: the n-th on a group shares store keys
_INSTANCES: dict[str, itertools.count[int]] = {}


class PipelineError(RuntimeError):
    """A stage of a :class:`DecoupledPipeline` failed (an exception, or its process stopped)."""


def split_sequential(model: nn.Sequential, points: Sequence[int]) -> list[nn.Sequential]:
    """Cut ``model`` before each index in ``points``: ``split_sequential(m, [2])`` gives ``m[:2]``, ``m[2:]``.

    Args:
        model: The model, an ``nn.Sequential``.
        points: Strictly increasing indices in ``(0, len(model))``.

    Returns:
        ``len(points) + 1`` stages, each an ``nn.Sequential`` sharing ``model``'s modules.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    cuts = [0, *points, len(model)]
    if any(not isinstance(p, int) or isinstance(p, bool) for p in points) or any(
        a >= b for a, b in itertools.pairwise(cuts)
    ):
        raise ValueError(f"points must be strictly increasing ints in (0, {len(model)}), got {list(points)}")
    return [cast(nn.Sequential, model[a:b]) for a, b in itertools.pairwise(cuts)]


def _check_no_shared_parameters(stages: Sequence[Any]) -> None:
    """Refuse stages that share a parameter (tied weights, a block in two stages): each process would train its
    own copy and the ties would silently come apart. Stages given as builders are not seen here."""
    owner: dict[int, tuple[int, str]] = {}
    for k, stage in enumerate(stages):
        if not isinstance(stage, nn.Module):
            continue
        for name, p in stage.named_parameters(remove_duplicate=False):
            if not p.requires_grad:  # a frozen copy cannot drift apart
                continue
            first = owner.setdefault(id(p), (k, name))
            if first[0] != k:
                raise ValueError(
                    f"stages {first[0]} and {k} share a parameter ({first[1]!r} of stage {first[0]} is {name!r} of "
                    f"stage {k}: tied weights, or one block in two stages); each stage runs in its own process and "
                    "trains its own copy, so the tie would come apart. Keep tied parameters in one stage"
                )


def _scratch(module: nn.Module, prefix: str, args: tuple[Any, ...]) -> Any:
    """``module(*args)`` with the buffers under ``prefix`` (running statistics) replaced by throwaway copies.

    A recomputed prediction: the batch was counted in the running statistics when the prediction was first
    made, and must not be counted again.
    """
    buffers = {name: b.clone() for name, b in module.named_buffers() if name.startswith(prefix)}
    if not buffers:
        return module(*args)
    return torch.func.functional_call(module, buffers, args)


def _input_features(module: nn.Module) -> int | None:
    """Input features of ``module`` (last dim) when its first layer tells (else ``None``)."""
    if isinstance(module, nn.Sequential):
        for child in module:
            if isinstance(child, _SHAPE_PRESERVING):
                continue
            return _input_features(child)
        return None
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.BatchNorm1d):
        return module.num_features
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return int(module.normalized_shape[0])
    return None


def _unlocked_stages(synthetic_inputs: Any, num_stages: int) -> frozenset[int]:
    """The stages that get a forward synthesizer: ``True`` is every stage but 0, a sequence names them."""
    if isinstance(synthetic_inputs, bool):
        return frozenset(range(1, num_stages)) if synthetic_inputs else frozenset()
    if not isinstance(synthetic_inputs, (list, tuple, set, frozenset, range)) or any(
        isinstance(k, bool) or not isinstance(k, int) for k in synthetic_inputs
    ):
        raise TypeError(
            f"synthetic_inputs must be a bool or a sequence of stage indices, got {synthetic_inputs!r}"
        )
    stages = frozenset(synthetic_inputs)
    if 0 in stages:
        raise ValueError(
            "synthetic_inputs names stage 0, which reads the batch itself: only stages 1 .. "
            f"{num_stages - 1} can predict their input"
        )
    bad = sorted(k for k in stages if not 0 < k < num_stages)
    if bad:
        raise ValueError(
            f"synthetic_inputs names stages {bad}, outside 1 .. {num_stages - 1} of this {num_stages}-stage pipeline"
        )
    return stages


class DecoupledPipeline:
    """Train ``stages`` as a pipeline of processes, each stage updated at once from its synthetic gradient.

    Every rank of the process group constructs the pipeline with the same arguments and calls :meth:`step`
    with the same batches (each rank reads the data: stage 0 uses the inputs, the last stage and, with
    ``context_size``, every stage use the labels). Rank ``k`` of the group runs ``stages[k]``.

    Args:
        stages: One module per rank, in order, or zero-argument callables that build them (only the local
            one is built). :func:`split_sequential` cuts an ``nn.Sequential`` into stages.
        loss_fn: ``loss_fn(output, target) -> scalar`` of the last stage.
        optimizer: The stages' optimizer: a name (as :class:`~altgrad.dni.DNI`'s ``optim``), an
            ``Optimizer`` class, or a callable ``params -> Optimizer``.
        lr: Learning rate for a name or class ``optimizer``.
        hidden_size: Hidden width of each synthesizer.
        dni_network: Synthesizer class, feed-forward (no recurrent state); a stage that produces convolutional
            feature maps needs the matching convolutional one (``Conv1dDNI``, ``Conv2dDNI``, ``Conv3dDNI``).
        dni_params: Extra keyword arguments for ``dni_network``.
        grad_optim: Optimizer of the synthesizers (name, class or callable).
        grad_lr: Its learning rate.
        context_size: Number of classes for cDNI (label-conditioned synthesizers); 0 disables it.
        scale: Factor applied to the synthetic gradients.
        staleness: Bound ``s >= 0`` on the age of the targets (see the module docstring).
        group: The process group (default: the world). Its size must be ``len(stages)``.
        device: Where the stage runs; default ``cuda`` (current device) under NCCL, else CPU.
        failure_timeout: Seconds a failing stage waits for its neighbours to take its failure header.
        synthetic_inputs: Forward unlocking (see the module docstring): ``True`` gives every stage ``k >= 1`` a
            forward synthesizer ``I_k`` (a ``dni_network`` of ``hidden_size``, trained by ``grad_optim`` at
            ``grad_lr``, one step per arrived activation) that predicts its input from the batch's ``x``
            (and ``y`` with ``context_size``); a sequence of stage indices picks the stages. Those stages need
            ``x`` in :meth:`step`, a first layer that tells their input width (``nn.Linear``,
            ``nn.BatchNorm1d``, ``nn.LayerNorm``) and ``(B, features)`` inputs; ``dni_network`` must be
            feature-last (e.g. ``LinearDNI``).
        transport: How neighbours exchange messages. ``"socket"``: a Unix socket (stages on one host, on the
            CPU); an error if one cannot be connected. ``"process_group"``: the group's ``isend`` / ``irecv``.
            ``"auto"`` (default): a socket to each neighbour it can connect to, the process group otherwise
            (every pair of neighbours agrees through the group's store).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module | Callable[[], nn.Module]],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        optimizer: Any = "adam",
        *,
        lr: float = 1e-3,
        hidden_size: int = 256,
        dni_network: type[nn.Module] = LinearDNI,
        dni_params: dict[str, Any] | None = None,
        grad_optim: Any = "adam",
        grad_lr: float = 1e-3,
        context_size: int = 0,
        scale: float = 1.0,
        staleness: int = 1,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        failure_timeout: float = 5.0,
        synthetic_inputs: bool | Sequence[int] = False,
        transport: str = "auto",
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DecoupledPipeline needs an initialised torch.distributed process group")
        self.group = group
        self.num_stages = dist.get_world_size(group)
        self.stage = dist.get_rank(group)
        self.failure_timeout = 5.0
        self._store = self._default_store()
        name = (group if group is not None else dist.distributed_c10d._get_default_group()).group_name
        key = f"altgrad_dni_pipeline/{name}/{next(_INSTANCES.setdefault(name, itertools.count()))}"
        self._failure_key, self._failure_count = f"{key}/failure", f"{key}/failures"
        self._links: dict[int, GroupLink | SocketLink] = {}
        self._closed = False
        try:
            if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
                raise ValueError(f"staleness must be an int >= 0, got {staleness!r}")
            if not callable(loss_fn):
                raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
            if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 0:
                raise ValueError(f"context_size must be an int >= 0, got {context_size!r}")
            if transport not in _TRANSPORTS:
                raise ValueError(f"transport must be one of {_TRANSPORTS}, got {transport!r}")
            if len(stages) != self.num_stages:
                raise ValueError(
                    f"stages has {len(stages)} entries but the process group has {self.num_stages} ranks: one stage "
                    "per rank"
                )
            if self.num_stages < 2:
                raise ValueError("a pipeline needs at least 2 stages (ranks); use DNI in one process")
            unlocked = _unlocked_stages(synthetic_inputs, self.num_stages)
            if unlocked and int(getattr(dni_network, "feature_dim", -1)) != -1:
                raise ValueError(
                    f"synthetic_inputs needs a feature-last dni_network (e.g. LinearDNI): the forward synthesizer "
                    f"maps (B, features) inputs, got dni_network={getattr(dni_network, '__name__', dni_network)}"
                )
            backend = dist.get_backend(self.group)
            if device is None:
                device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
            self.device = torch.device(device)
            _check_no_shared_parameters(stages)
            entry = stages[self.stage]
            module = entry if isinstance(entry, nn.Module) else entry()
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"stages[{self.stage}] must be an nn.Module or build one, got {type(module).__name__}"
                )
            self.module = module.to(self.device)
            self.loss_fn = loss_fn
            self.staleness = staleness
            self.scale = float(scale)
            self.context_size = context_size
            self.failure_timeout = float(failure_timeout)
            self.first = self.stage == 0
            self.last = self.stage == self.num_stages - 1
            self._peers = [
                dist.get_global_rank(self.group, r) if self.group is not None else r
                for r in range(self.num_stages)
            ]
            make_opt = optimizer if callable(optimizer) and not isinstance(optimizer, type) else None
            if make_opt is None:
                make_opt = optimizer_factory(optimizer, float(lr), "optimizer")
            if make_opt is None:
                raise ValueError("optimizer must not be None: the pipeline steps every stage itself")
            self.optimizer: torch.optim.Optimizer = make_opt(
                [p for p in self.module.parameters() if p.requires_grad]
            )
            make_synth_opt = (
                grad_optim
                if callable(grad_optim) and not isinstance(grad_optim, type)
                else optimizer_factory(grad_optim, float(grad_lr), "grad_optim")
            )
            if make_synth_opt is None:
                raise ValueError("grad_optim must not be None: each stage trains its own synthesizer")
            self._grad_optim: Callable[[list[nn.Parameter]], torch.optim.Optimizer] = make_synth_opt
            self.dni_network = dni_network
            self.dni_params = dict(dni_params or {})
            self.hidden_size = hidden_size
            self.interface: BackwardInterface | None = None
            self.grad_optimizer: torch.optim.Optimizer | None = None
            self._feature_dim = int(getattr(dni_network, "feature_dim", -1))
            if not self.last:
                check_synthesizer_fits(
                    f"stage {self.stage}", self.module, dni_network, "or cut after a linear layer"
                )
                features = _infer_features(self.module, self._feature_dim)
                if features is not None:
                    self._build(features)
            # this stage predicts its input (forward unlocking)
            self.synthetic_inputs = self.stage in unlocked
            self.forward_interface: ForwardInterface | None = None
            self.forward_optimizer: torch.optim.Optimizer | None = None
            self._input_features: int | None = None
            if self.synthetic_inputs:
                self._input_features = _input_features(self.module)
                if self._input_features is None:
                    raise ValueError(
                        f"synthetic_inputs: stage {self.stage} ({type(self.module).__name__}) must start with an "
                        "nn.Linear, nn.BatchNorm1d or nn.LayerNorm, whose width tells the shape of the input to predict"
                    )
            # real inputs the forward synthesizer trained on (batches 0 .. inputs_applied - 1)
            self.inputs_applied = 0
            # (batch, x, labels) of the batches whose real input h_{k-1} is still to come
            self._inputs: deque[tuple[int, Tensor, Tensor | None]] = deque()
            self.num_steps = 0  # batches this stage has run
            self.targets_applied = 0  # synthesizer targets trained on (batches 0 .. targets_applied - 1)
            # (batch, h, labels) awaiting targets
            self._stash: deque[tuple[int, Tensor, Tensor | None]] = deque()
            if transport == "socket" and (self.device.type != "cpu" or self._store is None):
                raise ValueError(
                    f"transport='socket' needs CPU stages and the process group's store, got device {self.device}"
                    + ("" if self._store is not None else " and no store")
                )
            self._connect(transport, f"{key}/links")
        except BaseException as exc:
            if not isinstance(exc, PipelineError):
                # the other ranks may be waiting to connect: they stop, naming this stage
                self._record_failure(f"stage {self.stage} raised {type(exc).__name__} at construction: {exc}")
            self.close()  # a neighbour already connected sees the end of the stream at once
            raise

    def _connect(self, transport: str, key: str) -> None:
        """One link per neighbour, connected now (every rank constructs the pipeline): a socket where
        ``transport`` allows and one connects, else the group's calls; each pair agrees through the store.

        A stage that failed meanwhile (its construction raised) stops the wait at once with
        :class:`PipelineError`; a neighbour that never constructs is waited for as long as the store's timeout.
        """
        queued = 4 * (self.staleness + 2)  # sends a stage may have queued before it waits
        timeout = float(getattr(self._store, "timeout", datetime.timedelta(minutes=30)).total_seconds())
        for stage in (self.stage - 1, self.stage + 1):
            if not 0 <= stage < self.num_stages:
                continue
            sock = None
            if transport != "process_group" and self.device.type == "cpu" and self._store is not None:
                try:
                    sock = connect_socket(
                        self._store, key, self.stage, stage, timeout, abort=self._failure_key
                    )
                except ConnectionError:
                    message = self._first_failure(f"a stage failed before stage {self.stage} could connect")
                    raise PipelineError(
                        f"pipeline stopped: {message} (stage {self.stage} stops too)"
                    ) from None
                except TimeoutError as exc:  # the neighbour never constructed its pipeline
                    message = self._record_failure(f"stage {stage} did not connect within {timeout:g} s")
                    raise PipelineError(f"pipeline stopped: {message} (seen by stage {self.stage})") from exc
                if sock is None and transport == "socket":
                    raise RuntimeError(
                        f"transport='socket': stage {self.stage} could not connect a Unix socket to stage {stage} "
                        "(another host, or another network namespace?); use transport='auto' or 'process_group'"
                    )
            self._links[stage] = (
                SocketLink(sock, timeout, queued)
                if sock is not None
                else GroupLink(self._peers[stage], self.group, self.device, queued)
            )

    def close(self) -> None:
        """Close the connections to the neighbours (their next wait on this stage ends with a
        :class:`PipelineError`). Call :meth:`flush` first to finish the run; the pipeline cannot be used after."""
        self._closed = True
        for link in self._links.values():
            link.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"stage {self.stage}'s pipeline was closed (close()): it cannot step or flush")

    @property
    def transports(self) -> dict[int, str]:
        """The transport to each neighbour stage: ``"socket"`` or ``"process_group"``."""
        return {k: "socket" if isinstance(v, SocketLink) else "process_group" for k, v in self._links.items()}

    # ------------------------------------------------------------------ construction
    def _build(self, features: int) -> None:
        synth = self.dni_network(
            input_size=features + self.context_size,
            hidden_size=self.hidden_size,
            output_size=features,
            **self.dni_params,
        )
        if hasattr(synth, "rnn"):
            raise ValueError(
                f"dni_network={type(synth).__name__} has recurrent state; the pipeline predicts each batch's gradient "
                "on its own, so it needs a feed-forward synthesizer such as LinearDNI"
            )
        ref = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        synth = synth.to(device=self.device, dtype=ref.dtype if ref is not None else None)
        self.interface = BackwardInterface(
            synth, context_size=self.context_size, scale=self.scale, feature_dim=self._feature_dim
        )
        self.grad_optimizer = self._grad_optim([p for p in synth.parameters() if p.requires_grad])
        self._features = features

    def _build_forward(self, trigger_features: int) -> None:
        assert self._input_features is not None
        synth = self.dni_network(
            input_size=trigger_features + self.context_size,
            hidden_size=self.hidden_size,
            output_size=self._input_features,
            **self.dni_params,
        )
        if hasattr(synth, "rnn"):
            raise ValueError(
                f"synthetic_inputs with dni_network={type(synth).__name__}: it has recurrent state; the forward "
                "synthesizer predicts each batch's input on its own, so it needs a feed-forward synthesizer such as "
                "LinearDNI"
            )
        ref = next((p for p in self.module.parameters() if p.is_floating_point()), None)
        synth = synth.to(device=self.device, dtype=ref.dtype if ref is not None else None)
        self.forward_optimizer = self._grad_optim([p for p in synth.parameters() if p.requires_grad])
        self.forward_interface = ForwardInterface(
            synth, context_size=self.context_size, optimizer=self.forward_optimizer
        )
        self._trigger_features = trigger_features

    @staticmethod
    def _default_store() -> Any:
        with contextlib.suppress(Exception):
            return dist.distributed_c10d._get_default_store()
        return None

    # ------------------------------------------------------------------ messages
    def _send(self, stage: int, batch: int, tensor: Tensor) -> None:
        """One message to neighbour ``stage``: returns once it is on its way (a few may be queued)."""
        try:
            self._links[stage].send(0, batch, tensor, self.stage)
        except ConnectionError as exc:
            self._lost(stage, exc)
        except TimeoutError as exc:
            self._stuck(stage, exc)

    def _recv(self, stage: int, batch: int) -> Tensor:
        try:
            status, got, tensor = self._links[stage].recv()
        except ConnectionError as exc:
            self._lost(stage, exc)
        except TimeoutError as exc:
            self._stuck(stage, exc)
        if status != 0:
            self._failed_elsewhere(status - 1, source=stage)
        if got != batch:
            raise self._fail(
                PipelineError(
                    f"stage {self.stage} expected batch {batch} from stage {stage} but got batch {got}: "
                    "the ranks are out of step (every rank must call step() for every batch)"
                )
            )
        assert tensor is not None
        return tensor

    # ------------------------------------------------------------------ failures
    def _record_failure(self, message: str) -> str:
        """Keep the first failure's text in the store; return the text every rank should report."""
        store = self._store
        if store is None:
            return message
        with contextlib.suppress(Exception):
            if store.add(self._failure_count, 1) == 1:
                store.set(self._failure_key, message)
                return message
            store.wait([self._failure_key], datetime.timedelta(seconds=self.failure_timeout))
            return store.get(self._failure_key).decode()
        return message

    def _first_failure(self, fallback: str) -> str:
        store = self._store
        with contextlib.suppress(Exception):
            if store is not None:
                store.wait([self._failure_key], datetime.timedelta(seconds=self.failure_timeout))
                return store.get(self._failure_key).decode()
        return fallback

    def _poison(self, failed: int, skip: int | None = None) -> None:
        """Send a failure header to the neighbours (except ``skip``) so that none of them waits for data."""
        told = [link for stage, link in self._links.items() if stage != skip]
        for link in told:  # posted to every neighbour first: a slow one does not delay the others' header
            with contextlib.suppress(Exception):
                link.post_failure(failed + 1)
        deadline = time.monotonic() + self.failure_timeout
        for link in told:
            with contextlib.suppress(Exception):
                link.flush(max(0.0, deadline - time.monotonic()))

    def _stuck(self, stage: int, exc: BaseException) -> NoReturn:
        """Neighbour ``stage`` is alive but exchanged nothing for the store's timeout: it is the one reported."""
        message = self._record_failure(f"stage {stage} is stuck: {exc}")
        self._poison(stage)
        raise PipelineError(f"pipeline stopped: {message} (seen by stage {self.stage})") from exc

    def _fail(self, exc: BaseException) -> BaseException:
        """This stage failed: record it, tell the neighbours, and return ``exc`` for the caller to raise."""
        self._record_failure(f"stage {self.stage} raised {type(exc).__name__}: {exc}")
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"raised in altgrad.dni pipeline stage {self.stage} of {self.num_stages}")
        self._poison(self.stage)
        return exc

    def _failed_elsewhere(self, failed: int, source: int) -> NoReturn:
        message = self._first_failure(f"stage {failed} failed")
        self._poison(failed, skip=source)
        raise PipelineError(f"pipeline stopped: {message} (stage {self.stage} stops too)")

    def _lost(self, stage: int, exc: BaseException) -> NoReturn:
        """The connection to ``stage`` broke: report the failure it sent first, else that it stopped."""
        status = self._links[stage].failure(self.failure_timeout)
        if status is not None:
            self._failed_elsewhere(status - 1, source=stage)
        message = self._record_failure(
            f"stage {stage} stopped: its connection closed ({exc}); was its process killed?"
        )
        self._poison(stage, skip=stage)
        raise PipelineError(f"pipeline stopped: {message} (seen by stage {self.stage})") from exc

    # ------------------------------------------------------------------ training
    def _train_synthesizer(self, upto: int) -> None:
        """Receive the targets of the kept batches up to ``upto`` and train the synthesizer on them."""
        trained = False
        while self._stash and self._stash[0][0] <= upto:
            batch, h, labels = self._stash.popleft()
            target = self._recv(self.stage + 1, batch)
            iface = self.interface
            assert iface is not None
            x = iface._synth_input((h,), labels)  # labels: the context as encoded at the forward (_step)
            pred = self._recompute(x)
            run_backward((pred,), (sg_loss_grad(pred, target, h.shape[iface.batch_dim]),))
            iface._observe(pred, target, h.shape[iface.batch_dim])
            self.targets_applied += 1
            trained = True
        if trained:
            assert self.grad_optimizer is not None
            update(self.grad_optimizer)

    def _recompute(self, x: Tensor) -> Tensor:
        """The synthesizer's prediction for ``x`` again, at its current weights, with a graph to train it.

        The forward already counted the batch in the synthesizer's running statistics (batch norm); the
        recomputation updates throwaway copies of its buffers instead, so each batch counts once.
        """
        iface = self.interface
        assert iface is not None
        out = _scratch(cast(nn.Module, iface._modules["synthesizer"]), "", (x, None))
        return out[0] if isinstance(out, tuple) else out  # the forward checked this shape already

    def _train_forward(self, upto: int) -> None:
        """Receive the real inputs of the kept batches up to ``upto``; regress the forward synthesizer onto them."""
        while self._inputs and self._inputs[0][0] <= upto:
            batch, trigger, labels = self._inputs.popleft()
            h = self._recv(self.stage - 1, batch)
            iface = self.forward_interface
            assert iface is not None
            # recomputed prediction, loss ‖ĥ − h‖² / B, backward, optimizer step; running statistics: see _scratch
            _scratch(iface, "synthesizer.", (h, trigger, labels))
            self.inputs_applied += 1

    def _synthetic_input(self, batch: int, x: Tensor | None, context: Tensor | None) -> Tensor:
        """``ĥ_{k-1} = I_k(x[, y])`` for this batch (forward unlocking); keeps the trigger for ``I_k``'s target."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"stage {self.stage} needs the batch's inputs x: with synthetic_inputs it predicts its input from "
                f"them, got {type(x).__name__}"
            )
        trigger = x.to(self.device).reshape(x.shape[0], -1)
        if self.forward_interface is None:
            self._build_forward(trigger.shape[1])
        iface = self.forward_interface
        assert iface is not None
        assert self._input_features is not None
        ref = next(iface.synthesizer.parameters(), None)
        trigger = trigger.to(ref.dtype if ref is not None else torch.get_default_dtype())
        self._train_forward(batch - 1 - self.staleness)
        like = torch.empty(trigger.shape[0], self._input_features, device="meta")  # the shape to predict
        h_in = iface.synthetic_input(trigger, like, context)
        self._inputs.append((batch, trigger, context))
        return h_in

    def step(self, x: Tensor | None = None, y: Tensor | None = None) -> Tensor | None:
        """Run this rank's stage on one batch (every rank calls it for every batch).

        Args:
            x: The batch's inputs (used by stage 0 and by stages with ``synthetic_inputs``; may be ``None``
                elsewhere).
            y: The batch's targets (used by the last stage, and by every stage with ``context_size``).

        Returns:
            The loss (detached) on the last stage, ``None`` elsewhere.

        Raises:
            PipelineError: If another stage failed or stopped; the text names it.
        """
        self._check_open()
        batch = self.num_steps
        try:
            loss = self._step(batch, x, y)
        except PipelineError:
            raise
        except BaseException as exc:
            raise self._fail(exc) from None
        for link in self._links.values():  # what the kernel could not take yet goes on while the caller runs
            link.release()
        self.num_steps += 1
        return loss

    def _step(self, batch: int, x: Tensor | None, y: Tensor | None) -> Tensor | None:
        labels = None if y is None else y.to(self.device)
        if (self.last or self.context_size) and labels is None:
            raise TypeError(f"stage {self.stage} needs the batch's targets y")
        context = labels if self.context_size else None
        if self.first:
            if not isinstance(x, Tensor):
                raise TypeError(f"stage 0 needs the batch's inputs x, got {type(x).__name__}")
            h_in = x.to(self.device)
        elif self.synthetic_inputs:
            h_in = self._synthetic_input(batch, x, context).requires_grad_(True)
        else:
            h_in = self._recv(self.stage - 1, batch).requires_grad_(True)
        loss = None
        if self.last:
            loss = self.loss_fn(self.module(h_in), cast(Tensor, labels))
            loss.backward()
        else:
            self._train_synthesizer(batch - 1 - self.staleness)
            h = self.module(h_in)
            if not isinstance(h, Tensor) or not h.is_floating_point():
                got = h.dtype if isinstance(h, Tensor) else type(h).__name__
                raise TypeError(
                    f"stage {self.stage} ({type(self.module).__name__}) returned {got}; a stage must return one "
                    "floating tensor, the activation sent to the next stage (for an nn.LSTM, wrap it in a module that "
                    "returns its output sequence, out[0])"
                )
            if self.interface is None:
                check_feature_dim(f"stage {self.stage}", h, self._feature_dim, self.dni_network)
                self._build(h.shape[self._feature_dim])
            iface = self.interface
            assert iface is not None
            if context is not None and not context.is_floating_point():
                # encoded once: the stash keeps the encoding for the target
                context = one_hot_labels(context, self.context_size)
            sg = iface.synthetic_gradient(h, context)
            run_backward((h,), (mix_gradient(None, sg, 0.0, iface.scale).to(h.dtype),))
        update(self.optimizer)
        if not self.first:
            assert h_in.grad is not None
            self._send(self.stage - 1, batch, h_in.grad)
        if not self.last:
            out = h.detach()
            self._send(self.stage + 1, batch, out)
            self._stash.append((batch, out, context))
        return None if loss is None else loss.detach()

    def flush(self) -> None:
        """Train every synthesizer on all targets still on their way and complete all sends (collective)."""
        self._check_open()
        try:
            if self.synthetic_inputs:
                self._train_forward(self.num_steps)
            if not self.last:
                self._train_synthesizer(self.num_steps)
            for stage, link in self._links.items():
                try:
                    link.flush()
                except ConnectionError as exc:
                    self._lost(stage, exc)
                except TimeoutError as exc:
                    self._stuck(stage, exc)
        except PipelineError:
            raise
        except BaseException as exc:
            raise self._fail(exc) from None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This stage's state: module, optimizer, synthesizers and their optimizers, counters (after :meth:`flush`)."""
        if self._stash or self._inputs or any(link.pending for link in self._links.values()):
            raise RuntimeError("call flush() before state_dict(): targets or messages are still in flight")
        state: dict[str, Any] = {
            "stage": self.stage,
            "num_stages": self.num_stages,
            "num_steps": self.num_steps,
            "targets_applied": self.targets_applied,
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.interface is not None and self.grad_optimizer is not None:
            state["features"] = self._features
            state["synthesizer"] = self.interface.synthesizer.state_dict()
            state["grad_optimizer"] = self.grad_optimizer.state_dict()
        if self.forward_interface is not None and self.forward_optimizer is not None:
            state["inputs_applied"] = self.inputs_applied
            state["trigger_features"] = self._trigger_features
            state["forward_synthesizer"] = self.forward_interface.synthesizer.state_dict()
            state["forward_optimizer"] = self.forward_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s data for this stage."""
        if state.get("stage") != self.stage or state.get("num_stages") != self.num_stages:
            raise ValueError(
                f"this is stage {self.stage} of {self.num_stages}; the state is stage {state.get('stage')} of "
                f"{state.get('num_stages')}"
            )
        if self._stash or self._inputs or any(link.pending for link in self._links.values()):
            raise RuntimeError(
                "call flush() before load_state_dict(): targets or messages are still in flight"
            )
        if "forward_synthesizer" in state and not self.synthetic_inputs:
            raise ValueError(
                f"the state has a forward synthesizer for stage {self.stage}, but this pipeline was built without "
                "synthetic_inputs for it"
            )
        if "synthesizer" in state and self.interface is None:
            self._build(int(state["features"]))
        if "forward_synthesizer" in state and self.forward_interface is None:
            self._build_forward(int(state["trigger_features"]))
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "synthesizer" in state:
            assert self.interface is not None
            assert self.grad_optimizer is not None
            self.interface.synthesizer.load_state_dict(state["synthesizer"])
            self.grad_optimizer.load_state_dict(state["grad_optimizer"])
        if "forward_synthesizer" in state:
            assert self.forward_interface is not None
            assert self.forward_optimizer is not None
            self.forward_interface.synthesizer.load_state_dict(state["forward_synthesizer"])
            self.forward_optimizer.load_state_dict(state["forward_optimizer"])
        self.num_steps = int(state["num_steps"])
        self.targets_applied = int(state["targets_applied"])
        self.inputs_applied = int(state.get("inputs_applied", 0))

    def save(self, path: str) -> None:
        """Write every stage's state to one file (collective: call it on every rank; rank 0 writes).

        The pipeline is flushed first, so the file holds no message in flight.
        """
        self.flush()
        local = _to_cpu(self.state_dict())
        if self.stage == 0:
            gathered = [local]
            for stage in range(
                1, self.num_stages
            ):  # each stage's torch.save bytes (no pickle of live objects)
                size = torch.empty(1, dtype=torch.int64, device=self.device)
                dist.recv(size, self._peers[stage], group=self.group)
                data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
                dist.recv(data, self._peers[stage], group=self.group)
                raw = bytearray(data.numel())
                torch.frombuffer(raw, dtype=torch.uint8).copy_(data.cpu())
                gathered.append(torch.load(io.BytesIO(bytes(raw)), weights_only=True))
            torch.save({"version": 1, "stages": gathered}, path)
        else:
            buf = io.BytesIO()
            torch.save(local, buf)
            data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(self.device)
            dist.send(torch.tensor([data.numel()], device=self.device), self._peers[0], group=self.group)
            dist.send(data, self._peers[0], group=self.group)
        dist.barrier(group=self.group)

    def load(self, path: str) -> None:
        """Restore every stage from :meth:`save`'s file (collective: every rank reads its stage's part)."""
        self.flush()
        saved = torch.load(path, map_location=self.device, weights_only=True)
        if (
            not isinstance(saved, dict)
            or saved.get("version") != 1
            or len(saved["stages"]) != self.num_stages
        ):
            raise ValueError(f"{path} is not a checkpoint of a {self.num_stages}-stage DecoupledPipeline")
        self.load_state_dict(saved["stages"][self.stage])
        dist.barrier(group=self.group)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
