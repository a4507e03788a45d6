"""``PerturbedModel``: NESgpu's wrapper that runs a model's population and broadcasts the ES workflow calls."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .base import Perturbed, check_noise_position
from .noise import Members
from .plan import Plan, build_plan, tie_noise

__all__ = ["PerturbedModel"]

#: Prefix of the noise-position entries in :meth:`PerturbedModel.state_dict`.
_ES_PREFIX = "es_layers:"


def _as_int64(value: int) -> int:
    """``value`` modulo ``2**64`` as a signed 64-bit int (the noise uses seeds modulo ``2**64``)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _fingerprint(text: str) -> int:
    """A 63-bit digest of ``text``, identical in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _padding_rows(layer: Any) -> set[int] | None:
    """The ``padding_idx`` row an Embedding unit leaves unperturbed, as a set (``None``: the use reads every row)."""
    pad = getattr(getattr(layer, "host", None), "padding_idx", None)
    if getattr(layer, "kind", None) != "embedding" or pad is None:
        return None
    return {int(pad)}


class PerturbedModel:
    """Wrap a model containing perturbed layers (NESgpu's ``PerturbedModel``).

    ``base_model.f(...)`` runs the ordinary, unperturbed model; ``perturbed_model.f(...)`` runs ``f`` with every
    perturbed layer in population mode (``perturbed_flag`` on), for any method ``f`` (``forward``, ``loss``, ...);
    calling the wrapper itself runs ``base_model(...)`` in population mode. The workflow methods
    (:meth:`set_noise`, :meth:`update`, ...) are applied to every perturbed layer.

    The layers are numbered 0, 1, ... in module order and share one seed: their ``layer_index`` keeps their noise
    independent (NESgpu gave every layer the same seed and the same noise).

    Args:
        base_model: An ``nn.Module`` whose perturbed layers (subclasses of :class:`~altgrad.es_layers.base.Perturbed`)
            form the population.
        directions: Population size; must match every perturbed layer's ``directions``.
        seed: Seed for all layers (``None``: keep a fresh one from the operating system). Give the same seed on
            every process of a distributed run.

    Raises:
        TypeError: If ``base_model`` is not an ``nn.Module``.
        ValueError: If it has no perturbed layer or a layer's ``directions`` differs.

    Example:
        >>> net = nn.Sequential(PerturbedLinear(4, 8, 16), nn.ReLU(), PerturbedLinear(8, 1, 16))
        >>> pm = PerturbedModel(net, 16, seed=0)
        >>> pm.set_noise()
        >>> with torch.no_grad():
        ...     losses = pm(torch.randn(32, 4)).pow(2).view(2, 16).sum(0)  # 2 repeats x 16 members
        >>> pm.set_grad(losses)
    """

    def __init__(self, base_model: nn.Module, directions: int, seed: int | None = None) -> None:
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
        if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
            raise ValueError(f"directions must be a positive int, got {directions!r}")
        # perturbed layers, and the units of modules perturbed in place (attention, LSTM, embedding, generic, ...)
        layers = [
            u
            for m in base_model.modules()
            for u in ([m] if isinstance(m, Perturbed) else getattr(m, "es_units", list)())
        ]
        if not layers:
            raise ValueError(
                "base_model has no perturbed layer (use perturb(model, directions) to convert one)"
            )
        for m in layers:
            if m.directions != directions:
                raise ValueError(f"layer {m!r} has directions={m.directions}, expected {directions}")
        object.__setattr__(self, "model", base_model)
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "perturbed_layers", layers)
        for i, layer in enumerate(layers):
            layer.set_layer_index(i)
        tie_noise(layers)  # every use of a tied parameter draws the noise of its first use
        self.set_seed(secrets.randbits(63) if seed is None else seed)

    # ------------------------------------------------------------------ population mode
    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """Context manager: perturbed layers run the population inside the block."""
        previous = [layer.perturbed_flag for layer in self.perturbed_layers]
        fastpath = torch.backends.mha.get_fastpath_enabled()
        for layer in self.perturbed_layers:
            layer.perturbed_flag = True
        # torch's fused transformer-layer kernel would bypass the perturbed submodules
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for layer, flag in zip(self.perturbed_layers, previous):
                layer.perturbed_flag = flag

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``base_model.forward`` on the population.

        Args:
            *args: Positional arguments of the model's forward (input ``(repeat_size * n, ...)``).
            **kwargs: Keyword arguments of the model's forward.

        Returns:
            Whatever the model returns.
        """
        with self.perturbed():
            return self.model(*args, **kwargs)

    __call__ = forward

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.model, name)
        if not callable(attr) or isinstance(attr, nn.Module):
            return attr

        def population_call(*args: Any, **kwargs: Any) -> Any:
            with self.perturbed():
                return attr(*args, **kwargs)

        population_call.__name__ = name
        population_call.__doc__ = getattr(attr, "__doc__", None)
        return population_call

    # ------------------------------------------------------------------ broadcast workflow
    def set_noise(self, noise_scale: float | None = None, *, step: int | None = None) -> None:
        """Draw the next step's noise in every layer (see :meth:`Perturbed.set_noise`).

        Args:
            noise_scale: If given, set ``σ`` of every layer first.
            step: Use this step instead of the next one.

        If any layer fails to draw its noise (for example ``MemoryError``), every layer returns to its previous
        step and σ (see :meth:`Perturbed.set_noise`) and the error propagates: no layer is left a step ahead.
        """
        before = [layer.noise_position() for layer in self.perturbed_layers]
        try:
            for layer in self.perturbed_layers:
                layer.set_noise(noise_scale, step=step)
        except BaseException:
            for layer, position in zip(self.perturbed_layers, before):
                layer.load_noise_position(position)
            raise

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        """The base model's ``state_dict`` plus the noise position of every perturbed layer.

        The extra entries (keys starting with ``"es_layers:"``) are 0-d tensors, so the dict loads with
        ``torch.load(..., weights_only=True)``: the model seed, and per layer its seed, current step, next step,
        ``σ`` of the next step and of the current noise, and a fingerprint of its configuration. With the
        optimizer's ``state_dict`` this is everything that determines the next steps: a run restored by
        :meth:`load_state_dict` in a new process continues bit-identically. The members (this process's shard)
        are not included.

        Returns:
            A flat dict of tensors.
        """
        out = dict(self.model.state_dict())
        out[_ES_PREFIX + "seed"] = torch.tensor(_as_int64(self.seed), dtype=torch.int64)
        out[_ES_PREFIX + "layers"] = torch.tensor(len(self.perturbed_layers), dtype=torch.int64)
        for i, layer in enumerate(self.perturbed_layers):
            pos = layer.noise_position()
            key = f"{_ES_PREFIX}{i}."
            out[key + "seed"] = torch.tensor(_as_int64(pos["seed"]), dtype=torch.int64)
            out[key + "step"] = torch.tensor(-1 if pos["step"] is None else pos["step"], dtype=torch.int64)
            out[key + "next_step"] = torch.tensor(pos["next_step"], dtype=torch.int64)
            out[key + "noise_scale"] = torch.tensor(pos["noise_scale"], dtype=torch.float64)
            sigma = float("nan") if pos["sigma"] is None else pos["sigma"]
            out[key + "sigma"] = torch.tensor(sigma, dtype=torch.float64)
            out[key + "config"] = torch.tensor(_fingerprint(layer.config_key()), dtype=torch.int64)
        return out

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> Any:
        """Restore a :meth:`state_dict`: the base model's parameters and buffers, and every layer's noise position.

        Everything is checked before anything is changed: a failed call leaves the model and its noise as they
        were. Seeds are restored modulo ``2**64``, which gives the same noise.

        Args:
            state_dict: A dict from :meth:`state_dict` (for example after ``torch.load(path, weights_only=True)``).
            strict: As in ``nn.Module.load_state_dict``; in addition the noise positions must be present. With
                ``strict=False`` a dict without them (a plain model's ``state_dict``) loads the weights only.

        Returns:
            The base model's ``load_state_dict`` result (missing and unexpected keys).

        Raises:
            ValueError: If the noise entries are incomplete or invalid, or were saved from layers of another
                configuration (mode, shapes, directions, antithetic, ...).
            RuntimeError: With ``strict=True``, if the model's keys or shapes differ.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        es_part = {k[len(_ES_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_ES_PREFIX)}
        model_part = {k: v for k, v in state_dict.items() if not k.startswith(_ES_PREFIX)}
        positions = self._check_es_part(es_part, strict)
        if strict:
            own = self.model.state_dict()
            missing = sorted(set(own) - set(model_part))
            unexpected = sorted(set(model_part) - set(own))
            wrong = sorted(
                k
                for k in set(own) & set(model_part)
                if isinstance(model_part[k], Tensor) and model_part[k].shape != own[k].shape
            )
            if missing or unexpected or wrong:
                raise RuntimeError(
                    f"load_state_dict: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}, "
                    f"shape mismatch for {wrong[:8]} (nothing was loaded)"
                )
        result = self.model.load_state_dict(model_part, strict=strict)
        if positions is not None:
            seed, layer_positions = positions
            for layer, position in zip(self.perturbed_layers, layer_positions):
                layer.load_noise_position(position)
            object.__setattr__(self, "seed", seed)
        return result

    def _check_es_part(self, es: dict[str, Any], strict: bool) -> tuple[int, list[dict[str, Any]]] | None:
        """Validate the ``es_layers:`` entries; return the seed and the layer positions (``None`` if absent)."""
        if not es:
            if strict:
                raise ValueError(
                    "load_state_dict: state_dict has no 'es_layers:' entries (noise positions); use "
                    "PerturbedModel.state_dict() to save, or strict=False / pm.model.load_state_dict to load "
                    "weights only"
                )
            return None

        def get(key: str) -> Tensor:
            if key not in es:
                raise ValueError(f"load_state_dict: missing entry {_ES_PREFIX + key!r}")
            v = es[key]
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise ValueError(f"load_state_dict: {_ES_PREFIX + key!r} must be a one-element tensor")
            return v

        n = int(get("layers").item())
        if n != len(self.perturbed_layers):
            raise ValueError(
                f"load_state_dict: the checkpoint has {n} perturbed layers, this model has "
                f"{len(self.perturbed_layers)}"
            )
        positions = []
        for i, layer in enumerate(self.perturbed_layers):
            key = f"{i}."
            if int(get(key + "config").item()) != _fingerprint(layer.config_key()):
                raise ValueError(
                    f"load_state_dict: perturbed layer {i} was saved with another configuration than "
                    f"{layer.config_key()!r}"
                )
            step = int(get(key + "step").item())
            sigma = float(get(key + "sigma").item())
            position = {
                "seed": int(get(key + "seed").item()),
                "step": None if step == -1 else step,
                "next_step": int(get(key + "next_step").item()),
                "noise_scale": float(get(key + "noise_scale").item()),
                "sigma": None if sigma != sigma else sigma,
            }
            try:
                check_noise_position(position)
            except (TypeError, ValueError) as e:
                raise ValueError(f"load_state_dict: perturbed layer {i}: {e}") from None
            positions.append(position)
        return int(get("seed").item()), positions

    def _parameter_grads(self, weights: Tensor, l1: float, l2: float) -> list[tuple[nn.Parameter, Tensor]]:
        """``Σ_k w_k E_k`` per distinct parameter, once: every use of a tied parameter draws the same noise.

        Everything is computed before any ``.grad`` is written, so bad weights leave every ``.grad`` unchanged.
        """
        sums: dict[int, tuple[nn.Parameter, Tensor, bool]] = {}
        padded: dict[
            int, set[int] | None
        ] = {}  # rows every use of a weight leaves out (Embedding padding_idx)
        for layer in self.perturbed_layers:
            g_w, g_b = layer.es_grad(weights)
            for p, g, is_weight in ((layer.weight, g_w, True), (layer.bias, g_b, False)):
                if p is None or g is None:
                    continue
                sums.setdefault(id(p), (p, g, is_weight))  # a tied parameter's later uses: the same term
                if is_weight:
                    rows = _padding_rows(layer)
                    before = padded.get(id(p), rows)
                    padded[id(p)] = None if rows is None or before is None else rows & before
        out = []
        with torch.no_grad():
            for p, g, is_weight in sums.values():
                for row in sorted(padded.get(id(p)) or ()):
                    # as backprop: an Embedding's padding_idx row gets no gradient when no other use reads it
                    g[row] = 0
                if is_weight and l1:
                    g += l1 * torch.sign(p)
                if is_weight and l2:
                    g += l2 * p
                out.append((p, g))
        return out

    def set_grad(self, weights: Tensor, l1: float = 0.0, l2: float = 0.0) -> None:
        """Write ``Σ_k w_k E_k`` into every perturbed parameter's ``.grad`` (overwriting).

        A parameter tied across several layers gets one term: all its uses see the same ``E_k`` (the noise of its
        first use); ``l1``/``l2`` act once per parameter.

        Args:
            weights: One weight per direction, shape ``(directions,)``; proportional to the loss to minimise it.
            l1: Adds ``l1 * sign(weight)`` to each weight gradient.
            l2: Adds ``l2 * weight`` to each weight gradient.

        Raises:
            ValueError: If ``weights`` has the wrong shape or holds NaN/inf (no ``.grad`` is changed).
        """
        for p, g in self._parameter_grads(weights, l1, l2):
            p.grad = g

    def update(self, weights: Tensor, l1: float = 0.0, l2: float = 0.0) -> None:
        """Add ``Σ_k w_k E_k`` into every perturbed parameter's ``.grad`` (NESgpu HEAD's ``update``).

        Tied parameters get one term, as in :meth:`set_grad`.

        Args:
            weights: One weight per direction, shape ``(directions,)``.
            l1: Adds ``l1 * sign(weight)`` to each weight gradient.
            l2: Adds ``l2 * weight`` to each weight gradient.

        Raises:
            ValueError: If ``weights`` has the wrong shape or holds NaN/inf (no ``.grad`` is changed).
        """
        for p, g in self._parameter_grads(weights, l1, l2):
            if p.grad is None:
                p.grad = g
            else:
                p.grad += g

    def allocate_memory(self) -> None:
        """NESgpu compatibility: a no-op on every layer (noise is drawn by :meth:`set_noise`)."""
        for layer in self.perturbed_layers:
            layer.allocate_memory()

    def free_memory(self) -> None:
        """Drop all stored noise (it is regenerated from the seed when needed)."""
        for layer in self.perturbed_layers:
            layer.free_memory()

    def set_seed(self, seed: int | None = None) -> None:
        """Give every layer the same base seed (their ``layer_index`` keeps the streams independent).

        Args:
            seed: Any Python int; ``None`` draws a fresh one from the operating system.
        """
        if seed is None:
            seed = secrets.randbits(63)
        for layer in self.perturbed_layers:
            layer.set_seed(seed)
        object.__setattr__(self, "seed", seed)

    def set_noise_scale(self, noise_scale: float) -> None:
        """Set ``σ`` of every layer.

        Args:
            noise_scale: Positive float.
        """
        for layer in self.perturbed_layers:
            layer.set_noise_scale(noise_scale)

    def set_members(self, members: Members | None = None) -> None:
        """Evaluate only these members in this process (see :meth:`Perturbed.set_members`).

        Args:
            members: Member indices; ``None`` restores all.
        """
        for layer in self.perturbed_layers:
            layer.set_members(members)

    @property
    def members(self) -> Tensor:
        """Member indices this process evaluates."""
        return self.perturbed_layers[0].members

    @property
    def step(self) -> int | None:
        """Step of the current noise (``None`` before the first :meth:`set_noise`)."""
        return self.perturbed_layers[0].step

    @property
    def noise_memory_bytes(self) -> int:
        """Bytes of noise currently stored by all layers."""
        return sum(layer.noise_memory_bytes for layer in self.perturbed_layers)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The base model's parameters (for the optimizer).

        Args:
            recurse: As in ``nn.Module.parameters``.

        Returns:
            An iterator over the parameters.
        """
        return self.model.parameters(recurse)

    def es_grads(self, weights: Tensor) -> dict[str, Tensor]:
        """``Σ_k w_k E_k`` for every perturbed parameter, by qualified name, without touching ``.grad``.

        Args:
            weights: One weight per direction, shape ``(directions,)``.

        Returns:
            A dict mapping parameter names (as in ``base_model.named_parameters()``, so a tied parameter appears
            once) to gradient estimates.
        """
        grads = {id(p): g for p, g in self._parameter_grads(weights, 0.0, 0.0)}
        return {name: grads[id(p)] for name, p in self.model.named_parameters() if id(p) in grads}

    def es_plan(self) -> Plan:
        """Which batched path and noise each parameter of the model takes (see :class:`~altgrad.es_layers.plan.Plan`).

        Returns:
            One :class:`~altgrad.es_layers.plan.PlanEntry` per distinct parameter (``print`` it for a table); after
            :func:`~altgrad.es_layers.perturb` without ``include=``, ``plan.not_perturbed`` is empty.
        """
        return build_plan(self.model, self.perturbed_layers)

    def __repr__(self) -> str:
        return f"PerturbedModel(directions={self.directions}, layers={len(self.perturbed_layers)}, model={self.model})"
