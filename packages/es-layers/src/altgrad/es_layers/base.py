"""The state and workflow shared by every perturbed layer: seeds, steps, members, the update into ``.grad``.

A perturbed layer holds ordinary parameters ``weight`` (shape ``(out, in, *kernel)``) and optional ``bias``.
Population member ``k`` uses ``weight + E_k`` and ``bias + ε_k``; ``E_k`` and ``ε_k`` are regenerated on demand from
``(seed, step, layer_index, k)`` with the counter-based samplers of :mod:`altgrad.es_layers.noise`, so they never
depend on torch's global RNG, nor on which members this process evaluates.

What ``E_k`` is (IID, sparse, permuted, sign-flip, low-rank) is defined in :mod:`altgrad.es_layers.modes`;
how the batched forward uses it is defined in :mod:`altgrad.es_layers.linear` and :mod:`altgrad.es_layers.conv`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from . import noise as _noise
from .noise import Members

__all__ = ["Perturbed"]

# Streams of one layer's key (see noise.py): independent tensors of one (seed, step, layer).
STREAM_WEIGHT = 0
STREAM_BIAS = 1
STREAM_SHARED = 2
STREAM_IN = 3
STREAM_OUT = 4
STREAM_A = 5
STREAM_B = 6

# Members per chunk are chosen so that one chunk's regenerated noise holds about this many elements.
_CHUNK_ELEMENTS = 1 << 22


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _check_scale(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return float(value)


#: NESgpu's layer ``options`` (all speed hints there): accepted for compatibility, the values never change.
NESGPU_OPTIONS = ("allow_repeats", "combined", "direct")


def _check_options(options: object) -> dict[str, Any]:
    """NESgpu's ``options=`` dict: known keys only (``direct``, ``combined``, ``allow_repeats``)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict or None, got {type(options).__name__}")
    unknown = sorted(set(options) - set(NESGPU_OPTIONS))
    if unknown:
        raise ValueError(f"options: unknown key(s) {unknown}; NESgpu's keys are {list(NESGPU_OPTIONS)}")
    return dict(options)


_POSITION_KEYS = ("seed", "step", "next_step", "noise_scale", "sigma")


def check_noise_position(position: dict[str, Any]) -> tuple[int, int | None, int, float, float | None]:
    """Validate a layer's noise position (see :meth:`Perturbed.noise_position`) without applying it.

    Args:
        position: Dict with keys ``seed``, ``step``, ``next_step``, ``noise_scale`` and ``sigma``.

    Returns:
        ``(seed, step, next_step, noise_scale, sigma)``.

    Raises:
        ValueError: If a key is missing or a value is invalid.
    """
    if not isinstance(position, dict):
        raise TypeError(f"position must be a dict, got {type(position).__name__}")
    missing = sorted(set(_POSITION_KEYS) - set(position))
    if missing:
        raise ValueError(f"position: missing key(s) {missing}")
    seed, step, next_step = position["seed"], position["step"], position["next_step"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"position['seed'] must be an int, got {seed!r}")
    for name, v in (("step", step), ("next_step", next_step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"position[{name!r}] must be a non-negative int or None, got {v!r}")
    if next_step is None:
        raise ValueError("position['next_step'] must be a non-negative int, got None")
    try:
        noise_scale = _check_scale("noise_scale", position["noise_scale"])
        sigma = position["sigma"]
        if sigma is not None:
            sigma = _check_scale("sigma", sigma)
    except TypeError as e:
        raise ValueError(f"position: {e}") from None
    if step is not None and sigma is None:
        raise ValueError("position['sigma'] must be a float when position['step'] is set")
    return seed, step, next_step, noise_scale, sigma


class Perturbed:
    """Mixin giving an ``nn.Module`` with ``weight``/``bias`` a population of perturbations.

    Subclasses combine a noise structure from :mod:`altgrad.es_layers.modes` with a forward
    (:class:`~altgrad.es_layers.PerturbedLinear`, :class:`~altgrad.es_layers.PerturbedConv2d`, ...).

    Attributes:
        directions: Population size ``N`` (number of distinct perturbations per step).
        antithetic: If true and the input holds an even number ``R > 1`` of repeats, repeats ``R/2 ... R-1``
            use ``-E_k`` (NESgpu's layout).
        noise_scale: ``σ``: the standard deviation of every noise entry (``E_k`` includes it).
        seed: Base seed of the noise.
        layer_index: Index that separates the streams of layers sharing a seed (set by ``PerturbedModel``).
        perturbed_flag: If false (default) the layer is the ordinary, unperturbed layer.
        members: The member indices this process evaluates (default ``range(directions)``).
        step: The step of the current noise (``None`` before the first :meth:`set_noise`).
        options: NESgpu's ``options`` dict (``direct``, ``combined``, ``allow_repeats``). They select
            implementations in NESgpu; here every layer has one implementation, so they are accepted and ignored
            (``allow_repeats`` never allows repeated indices: sampling without replacement is vectorised here).
    """

    weight: Tensor
    bias: Any  # Tensor or None (declared loosely to stay compatible with nn.Linear / nn.Conv2d)
    mode: str = "iid"

    def _init_perturbed(
        self,
        directions: int,
        antithetic: bool = True,
        noise_scale: float = 0.01,
        seed: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.directions = _check_positive_int("directions", directions)
        self.options = _check_options(options)
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic must be a bool, got {type(antithetic).__name__}")
        self.antithetic = antithetic
        self.noise_scale = _check_scale("noise_scale", noise_scale)
        self.layer_index = 0
        self.perturbed_flag = False
        self.step: int | None = None
        self._next_step = 0
        self.members = torch.arange(self.directions)
        self._noise: dict[str, Tensor] = {}
        self.set_seed(seed)

    # ------------------------------------------------------------------ state
    def set_seed(self, seed: int | None = None) -> None:
        """Set the base seed of this layer's noise.

        Args:
            seed: Any Python int; ``None`` draws a fresh one from the operating system (never from torch's RNG).
                Layers of one :class:`~altgrad.es_layers.PerturbedModel` may share a seed: their ``layer_index``
                keeps the streams independent.
        """
        if seed is None:
            seed = secrets.randbits(63)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self._noise = {}

    def set_noise_scale(self, noise_scale: float) -> None:
        """Set ``σ``, the standard deviation of the noise entries; takes effect at the next :meth:`set_noise`.

        Args:
            noise_scale: Positive float.
        """
        self.noise_scale = _check_scale("noise_scale", noise_scale)

    def set_layer_index(self, layer_index: int) -> None:
        """Set the layer index that separates this layer's noise from other layers sharing its seed.

        Args:
            layer_index: Non-negative int (``PerturbedModel`` numbers its layers 0, 1, ...).
        """
        if isinstance(layer_index, bool) or not isinstance(layer_index, int):
            raise TypeError(f"layer_index must be an int, got {type(layer_index).__name__}")
        if layer_index < 0:
            raise ValueError(f"layer_index must be >= 0, got {layer_index}")
        self.layer_index = layer_index
        self._noise = {}

    def set_members(self, members: Members | None = None) -> None:
        """Choose which population members this process evaluates (sharding).

        The forward then expects ``repeats * len(members)`` rows, member fastest. The update still uses all
        ``directions`` members: the noise of the others is regenerated from the seed.

        Args:
            members: Member indices in ``[0, directions)``; ``None`` restores ``range(directions)``.
        """
        if members is None:
            m = torch.arange(self.directions)
        else:
            m = _noise.member_tensor(members, device="cpu")
            if m.numel() == 0:
                raise ValueError("members must not be empty")
            if int(m.max()) >= self.directions:
                raise ValueError(f"members must be < directions={self.directions}, got {int(m.max())}")
        self.members = m
        self._noise = {}

    def set_noise(self, noise_scale: float | None = None, *, step: int | None = None) -> None:
        """Draw the noise of the next step (NESgpu's ``set_noise``).

        Each call advances the step counter, so every call gives fresh noise; the noise of a step is a pure
        function of ``(seed, step, layer_index, member)``.

        Args:
            noise_scale: If given, set ``σ`` first (see :meth:`set_noise_scale`).
            step: Use this step instead of the next one (for example to replay a step).

        Raises:
            ValueError: For a bad ``step`` or ``noise_scale``.

        The old noise is released before the new one is drawn, so the peak memory is one step's noise. If drawing
        fails (for example ``MemoryError``), the layer keeps its previous step, σ and next step, and regenerates
        that step's noise on demand: the call leaves no trace.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if noise_scale is not None:
            _check_scale("noise_scale", noise_scale)
        before = self.noise_position()
        self._noise = {}
        try:
            if noise_scale is not None:
                self.set_noise_scale(noise_scale)
            self.step = self._next_step if step is None else step
            self._next_step = self.step + 1
            self._sigma = self.noise_scale
            self._noise = self._generate(self.members)
        except BaseException:
            # no trace: the previous position comes back; its noise is regenerated on demand from the seed
            self.load_noise_position(before)
            raise

    def noise_position(self) -> dict[str, Any]:
        """Everything that fixes this layer's current and next noise (for checkpoints).

        Returns:
            A dict of Python numbers: ``seed``, ``step`` (``None`` before the first :meth:`set_noise`),
            ``next_step``, ``noise_scale`` (σ of the next step) and ``sigma`` (σ of the current noise).
            The members are not included: they describe this process's shard, not the run.
        """
        return {
            "seed": self.seed,
            "step": self.step,
            "next_step": self._next_step,
            "noise_scale": self.noise_scale,
            "sigma": getattr(self, "_sigma", None),
        }

    def load_noise_position(self, position: dict[str, Any]) -> None:
        """Restore a :meth:`noise_position`; the stored noise is dropped and regenerated on demand.

        Args:
            position: A dict returned by :meth:`noise_position` (of this layer or of an identical one).

        Raises:
            ValueError: If a key is missing or a value is invalid (nothing is changed).
        """
        seed, step, next_step, noise_scale, sigma = check_noise_position(position)
        self.seed, self.step, self._next_step, self.noise_scale = seed, step, next_step, noise_scale
        if sigma is None:
            self.__dict__.pop("_sigma", None)
        else:
            self._sigma = sigma
        self._noise = {}

    def config_key(self) -> str:
        """What fixes this layer's noise law and update besides its :meth:`noise_position`, as a string.

        Two layers with equal keys, positions and parameters compute bit-identical noise and updates; checkpoints
        and :func:`~altgrad.es_layers.all_gather_fitness` compare these keys.
        """
        extras = ("rank", "sparsity", "permutation", "in_sparsity", "out_sparsity", "flip", "groups")
        parts = [
            type(self).__name__,
            self.mode,
            f"directions={self.directions}",
            f"antithetic={self.antithetic}",
            f"layer_index={self.layer_index}",
            f"noise_index={self.noise_index}",
            f"weight={tuple(self.weight.shape)}",
            f"bias={None if self.bias is None else tuple(self.bias.shape)}",
        ]
        parts += [f"{k}={getattr(self, k)}" for k in extras if hasattr(self, k)]
        return "|".join(parts)

    def allocate_memory(self) -> None:
        """NESgpu compatibility: a no-op. Noise is allocated and drawn by :meth:`set_noise` (and regenerated on
        demand after :meth:`free_memory`), so there is nothing to reserve beforehand."""

    def free_memory(self) -> None:
        """Drop the stored noise.

        The next update (:meth:`update`, :meth:`set_grad`, :meth:`es_grad`) regenerates the noise from the seed in
        bounded chunks of members and stores nothing; the next perturbed forward regenerates and stores the noise of
        the members it evaluates.
        """
        self._noise = {}

    @property
    def noise_memory_bytes(self) -> int:
        """Bytes held by the stored noise of this layer."""
        return sum(t.numel() * t.element_size() for t in self._noise.values())

    # ------------------------------------------------------------------ noise generation
    #: ``(weight index, bias index)`` replacing ``layer_index`` in the noise key when a parameter is tied to an
    #: earlier layer's (set by ``PerturbedModel``; ``None``: ``layer_index`` for both).
    noise_index: tuple[int, int] | None = None

    def _key(self, stream: int) -> dict[str, Any]:
        layer = self.layer_index if self.noise_index is None else self.noise_index[stream == STREAM_BIAS]
        return {"seed": self.seed, "step": self.step, "layer": layer, "stream": stream}

    def _normal(self, shape: tuple[int, ...], stream: int, members: Members) -> Tensor:
        return _noise.sample_normal(
            shape, **self._key(stream), members=members, device=self.weight.device, dtype=self.weight.dtype
        )

    def _generate(self, members: Tensor) -> dict[str, Tensor]:
        """Noise needed by the forward and the update for ``members``: shared part plus per-member parts."""
        out = self._shared_noise()
        out.update(self._member_noise(members))
        if self.bias is not None:
            out["bias"] = self._normal(tuple(self.bias.shape), STREAM_BIAS, members).mul_(self._sigma)
        return out

    def _shared_noise(self) -> dict[str, Tensor]:
        """Member-independent noise (for example the shared matrix of permuted/sign-flip layers)."""
        return {}

    def _member_noise(self, members: Tensor) -> dict[str, Tensor]:
        """Per-member noise pieces for ``members``; every tensor has ``len(members)`` as first dimension."""
        raise NotImplementedError

    def _dense_weight(self, noise: dict[str, Tensor]) -> Tensor:
        """Materialise ``E_k`` for the members of ``noise``: shape ``(n, *weight.shape)``."""
        raise NotImplementedError

    def _weighted_sum(self, w: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """``Σ_k w_k E_k`` over the members of ``noise`` (``w`` has one entry per member)."""
        raise NotImplementedError

    def _per_member_elements(self) -> int:
        return self.weight.numel()

    def _current_noise(self) -> dict[str, Tensor]:
        if self.step is None:
            raise RuntimeError(
                f"{type(self).__name__}: call set_noise() before the perturbed forward or update()"
            )
        if not self._noise:
            self._noise = self._generate(self.members)
        return self._noise

    def dense_noise(self, members: Members | None = None) -> tuple[Tensor, Tensor | None]:
        """Materialise the perturbations of the current step as dense tensors (for checks and debugging).

        Args:
            members: Member indices (default: all ``directions``).

        Returns:
            ``(E, eps)``: ``E`` of shape ``(n, *weight.shape)`` and ``eps`` of shape ``(n, *bias.shape)``
            (``None`` without bias). These are exactly the perturbations the forward and the update use.
        """
        self._current_noise()
        m = torch.arange(self.directions) if members is None else _noise.member_tensor(members, "cpu")
        noise = self._generate(m)
        return self._dense_weight(noise), noise.get("bias")

    def _chunks(self) -> Iterator[range]:
        per = max(1, _CHUNK_ELEMENTS // max(1, self._per_member_elements()))
        for start in range(0, self.directions, per):
            yield range(start, min(start + per, self.directions))

    def _stored_covers_all(self) -> bool:
        return (
            bool(self._noise)
            and self.members.numel() == self.directions
            and bool(torch.equal(self.members, torch.arange(self.directions)))
        )

    # ------------------------------------------------------------------ update
    def _check_weights(self, weights: Tensor) -> Tensor:
        if not isinstance(weights, Tensor):
            try:
                weights = torch.as_tensor(weights)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError("weights must be a tensor or a sequence of numbers") from None
        if weights.is_complex() or weights.dtype == torch.bool:
            raise TypeError(f"weights must be real-valued, got dtype {weights.dtype}")
        if weights.dim() != 1 or weights.shape[0] != self.directions:
            raise ValueError(
                f"weights must have shape ({self.directions},) (one weight per direction), "
                f"got {tuple(weights.shape)}"
            )
        bad = ~torch.isfinite(weights)
        if bool(bad.any()):
            raise ValueError(
                f"weights must be finite, got NaN/inf for direction(s) {bad.nonzero().flatten()[:8].tolist()}: "
                "a non-finite fitness would move the weights by a non-finite step (nothing was changed)"
            )
        return weights.to(device=self.weight.device, dtype=self.weight.dtype)

    def es_grad(self, weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return ``(Σ_k w_k E_k, Σ_k w_k ε_k)`` without touching ``.grad``.

        Members are processed in fixed chunks (regenerated from the seed unless this process stores the noise of
        the whole population), so every process computes bit-identical results, and memory stays bounded by one
        chunk (about ``2**22`` noise values) after :meth:`free_memory` or on a shard.

        Args:
            weights: One weight per direction, shape ``(directions,)``.

        Returns:
            The weight-shaped and bias-shaped (or ``None``) sums.
        """
        w = self._check_weights(weights)
        if self.step is None:
            raise RuntimeError(
                f"{type(self).__name__}: call set_noise() before the perturbed forward or update()"
            )
        # stored noise of the whole population is reused; otherwise regenerate chunk by chunk and store nothing,
        # so the update's memory is bounded by one chunk (about _CHUNK_ELEMENTS values) whatever the population
        stored = self._noise if self._stored_covers_all() else None
        shared = self._shared_noise() if stored is None else None
        g_w = torch.zeros_like(self.weight, memory_format=torch.contiguous_format)
        g_b = None if self.bias is None else torch.zeros_like(self.bias)
        for chunk in self._chunks():
            if stored is not None:
                sl = slice(chunk.start, chunk.stop)
                noise = {k: (v if k.startswith("shared") else v[sl]) for k, v in stored.items()}
            else:
                noise = dict(shared)  # type: ignore[arg-type]
                noise.update(self._member_noise(torch.arange(chunk.start, chunk.stop)))
                if self.bias is not None:
                    noise["bias"] = self._normal(tuple(self.bias.shape), STREAM_BIAS, chunk).mul_(self._sigma)
            wc = w[chunk.start : chunk.stop]
            g_w += self._weighted_sum(wc, noise)
            if g_b is not None:
                g_b += (wc @ noise["bias"].reshape(wc.shape[0], -1)).view(g_b.shape)
        return g_w, g_b

    def _apply_grad(self, weights: Tensor, l1: float, l2: float, accumulate: bool) -> None:
        g_w, g_b = self.es_grad(weights)
        with torch.no_grad():
            if l1:
                g_w += l1 * torch.sign(self.weight)
            if l2:
                g_w += l2 * self.weight
        for p, g in ((self.weight, g_w), (self.bias, g_b)):
            if p is None or g is None:
                continue
            if accumulate and p.grad is not None:
                p.grad += g
            else:
                p.grad = g

    def update(self, weights: Tensor, l1: float = 0.0, l2: float = 0.0) -> None:
        """Add the ES gradient estimate ``Σ_k w_k E_k`` (and ``Σ_k w_k ε_k``) into ``param.grad``.

        No ``1/N`` or ``1/σ`` factor is applied: put them in ``weights``. With weights proportional to the loss
        (for example ``centered_ranks(loss)``), a ``torch.optim`` optimizer step then decreases the loss.

        Args:
            weights: One weight per direction, shape ``(directions,)``.
            l1: Adds ``l1 * sign(weight)`` to the weight gradient.
            l2: Adds ``l2 * weight`` to the weight gradient.

        Raises:
            RuntimeError: If :meth:`set_noise` was never called.
            ValueError: If ``weights`` does not have shape ``(directions,)`` or holds NaN/inf (``.grad`` is then
                left unchanged).
        """
        self._apply_grad(weights, l1, l2, accumulate=True)

    def set_grad(self, weights: Tensor, l1: float = 0.0, l2: float = 0.0) -> None:
        """Like :meth:`update` but overwrite ``param.grad`` (the seed README's ``set_grad``).

        Args:
            weights: One weight per direction, shape ``(directions,)``.
            l1: Adds ``l1 * sign(weight)`` to the weight gradient.
            l2: Adds ``l2 * weight`` to the weight gradient.
        """
        self._apply_grad(weights, l1, l2, accumulate=False)

    # ------------------------------------------------------------------ forward helpers
    def _repeats(self, shape: tuple[int, ...] | torch.Size) -> int:
        n = self.members.numel()
        batch = shape[0]
        if batch % n:
            hint = ""
            if len(shape) > 2 and shape[1] == n:
                hint = "; for a (repeat_size, directions, ...) tensor, flatten the first two dimensions"
            raise ValueError(
                f"{type(self).__name__}: the batch size ({batch}) must be a multiple of the number of "
                f"directions evaluated here ({n}); expected input of shape (repeat_size * {n}, ...){hint}"
            )
        r = batch // n
        if self.antithetic and r > 1 and r % 2:
            raise ValueError(
                f"{type(self).__name__}: antithetic sampling needs an even number of repeats, got "
                f"{r} (batch {batch} = {r} x {n} directions); use 1 or an even number, or antithetic=False"
            )
        return r

    def _signs(self, repeats: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """``(repeats,)`` tensor of +1 (first half) and -1 (second half), or ``None`` without antithetic."""
        if not self.antithetic or repeats == 1:
            return None
        s = torch.ones(repeats, dtype=dtype, device=device)
        s[repeats // 2 :] = -1
        return s

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        self._noise = {k: fn(v) for k, v in self._noise.items()}
        return out

    def _perturbed_repr(self) -> str:
        return (
            f"directions={self.directions}, mode={self.mode!r}, noise_scale={self.noise_scale}, "
            f"antithetic={self.antithetic}"
        )
