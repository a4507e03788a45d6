"""Noise distributions for the perturbation directions.

Two kinds of distribution are accepted wherever a ``distribution`` is expected:

* anything **Samplable** in TorchOpt's sense: an object with a ``sample(sample_shape)`` method (for example a
  `Normal`) or a plain callable ``fn(sample_shape)``. These are drawn from torch's global
  RNG, exactly like TorchOpt, but all members of a chunk are drawn in one call and on the parameter's device;
* the **seeded** distributions of this module (`SeededNormal`, `SeededRademacher`,
  `NoiseTable`). Their noise is a pure function of ``(seed, step, leaf, member)``, never touches the global
  RNG and is *regenerated* rather than stored, so memory does not grow with the number of samples (MeZO-style).
  They also implement ``sample`` and therefore work with TorchOpt itself.

Every distribution must have zero mean and unit variance per element (TorchOpt's requirement).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from altgrad.es_layers.noise import sample_normal, sample_rademacher

__all__ = ["NoiseTable", "Samplable", "SeededDistribution", "SeededNormal", "SeededRademacher"]


@runtime_checkable
class Samplable(Protocol):
    """TorchOpt's ``Samplable`` protocol: anything with a ``sample(sample_shape)`` method.

    `Distribution` instances qualify. As in TorchOpt, the check is structural: any object
    with a ``sample`` attribute is treated as Samplable, and this check wins over being callable.
    """

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor | Sequence[float]:  # noqa: B008
        """Return a sample of shape ``sample_shape`` (a batch of i.i.d. draws when it has extra leading dims).

        Args:
            sample_shape: Shape of the requested sample.

        Returns:
            A tensor (or nested sequence of numbers) of shape ``sample_shape``.
        """
        ...


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}")
    return seed


class SeededDistribution:
    """Base class of the regenerable, counter-based distributions.

    The noise of population member ``k`` for parameter leaf ``leaf`` at estimate ``step`` is a pure function of
    ``(seed, step, leaf, k)``. Each gradient estimate takes a fresh ``step`` from `next_step`, so consecutive
    estimates use independent noise while any estimate can regenerate its own noise exactly.

    Args:
        seed: Base seed (a Python int).

    Raises:
        TypeError: If ``seed`` is not an int.
    """

    #: Whether `draw` returns the same rows when called again with the same arguments.
    regenerable: bool = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = _check_seed(seed)
        self.step = 0

    def next_step(self) -> int:
        """Return the step counter for a new estimate and advance it.

        Returns:
            The step to use for the estimate being started.
        """
        step = self.step
        self.step += 1
        return step

    def draw(
        self,
        shape: Sequence[int],
        *,
        step: int,
        leaf: int,
        members: range,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw the noise of ``members`` for one parameter leaf.

        Args:
            shape: Shape of the parameter leaf.
            step: Estimate counter (from `next_step`).
            leaf: Index of the parameter leaf (distinct leaves get independent noise).
            members: Population member indices.
            device: Device of the result.
            dtype: Floating dtype of the result.

        Returns:
            Tensor of shape ``(len(members), *shape)``.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The noise position: ``{"seed": ..., "step": ...}`` (plain ints, loadable with ``weights_only=True``).

        Saved with the model and restored by `load_state_dict`, a resumed run draws the directions the
        uninterrupted run would have drawn. `ZeroOrderGradientModule` puts its seeded distribution's state in
        its own ``state_dict``.

        Returns:
            A new dict.
        """
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the seed and step saved by `state_dict`.

        Args:
            state: A dict from `state_dict`.

        Raises:
            TypeError: If ``seed`` or ``step`` is missing or not an int.
            ValueError: If ``step`` is negative.
        """
        seed, step = state.get("seed"), state.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"`state['step']` must be an int, got {type(step).__name__}")
        if step < 0:
            raise ValueError(f"`state['step']` must be >= 0, got {step}")
        self.seed = _check_seed(seed)
        self.step = step

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:  # noqa: B008
        """TorchOpt-style sampling: one fresh draw of shape ``sample_shape`` (advances the step counter).

        Args:
            sample_shape: Shape of the sample.

        Returns:
            A float32 CPU tensor of shape ``sample_shape``.
        """
        return self.draw(tuple(sample_shape), step=self.next_step(), leaf=0, members=range(1))[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


class SeededNormal(SeededDistribution):
    """Standard normal directions from ``altgrad.es_layers``' counter-based generator.

    Args:
        seed: Base seed (a Python int).

    Example:
        >>> from altgrad.zero_order import SeededNormal
        >>> d = SeededNormal(seed=0)
        >>> d.draw((3,), step=0, leaf=0, members=range(2)).shape
        torch.Size([2, 3])
    """

    def draw(
        self,
        shape: Sequence[int],
        *,
        step: int,
        leaf: int,
        members: range,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw standard normal rows (see `draw`).

        Args:
            shape: Shape of the parameter leaf.
            step: Estimate counter.
            leaf: Index of the parameter leaf.
            members: Population member indices.
            device: Device of the result.
            dtype: Floating dtype of the result.

        Returns:
            Tensor of shape ``(len(members), *shape)``.
        """
        return sample_normal(
            tuple(shape), seed=self.seed, step=step, layer=leaf, members=members, device=device, dtype=dtype
        )


class SeededRademacher(SeededDistribution):
    """Rademacher (±1) directions, as in SPSA and FZOO: zero mean, unit variance, lower estimator variance.

    Args:
        seed: Base seed (a Python int).
    """

    def draw(
        self,
        shape: Sequence[int],
        *,
        step: int,
        leaf: int,
        members: range,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw ±1 rows (see `draw`).

        Args:
            shape: Shape of the parameter leaf.
            step: Estimate counter.
            leaf: Index of the parameter leaf.
            members: Population member indices.
            device: Device of the result.
            dtype: Floating dtype of the result.

        Returns:
            Tensor of shape ``(len(members), *shape)`` holding -1 and +1.
        """
        return sample_rademacher(
            tuple(shape), seed=self.seed, step=step, layer=leaf, members=members, device=device, dtype=dtype
        )


class NoiseTable(SeededDistribution):
    """OpenAI-ES shared noise table: directions are windows into one pre-sampled normal vector.

    The table (``size`` standard normals, generated once per device and dtype from ``seed``) is reused by every
    estimate. The rows of a chunk are consecutive windows ``table[base + k * numel : base + (k + 1) * numel]``
    from a random ``base`` per (step, leaf, chunk), returned as a *view*: drawing costs nothing and no noise is
    copied. Each row is exactly standard normal and the rows of a chunk are disjoint. Only when the table is
    smaller than ``members * numel`` do windows overlap (with a random stride), which adds some correlation
    between directions. Directions of different estimates reuse the same table, as in OpenAI-ES. This is the fast
    mode for mid-size models, where sampling dominates the cost.

    Args:
        seed: Base seed (a Python int).
        size: Number of normals in the table (default ``2**24``, 64 MiB in float32).

    Raises:
        TypeError: If ``seed`` or ``size`` is not an int.
        ValueError: If ``size`` is smaller than 2.
    """

    def __init__(self, seed: int = 0, size: int = 1 << 24) -> None:
        super().__init__(seed)
        self._check_size(size)
        self.size = size
        self._tables: dict[tuple[str, torch.dtype], Tensor] = {}

    @staticmethod
    def _check_size(size: object) -> None:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"`size` must be an int, got {type(size).__name__}")
        if size < 2:
            raise ValueError(f"`size` must be >= 2, got {size}")

    def state_dict(self) -> dict[str, Any]:
        """Seed, step and table size (the table itself is regenerated from the seed).

        Returns:
            A new dict.
        """
        return {**super().state_dict(), "size": self.size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore seed, step and size (see `SeededDistribution.load_state_dict`); the table is rebuilt on use.

        Args:
            state: A dict from `state_dict`.
        """
        size = state.get("size", self.size)
        self._check_size(size)
        seed = self.seed
        super().load_state_dict(state)
        if size != self.size or seed != self.seed:
            self.size, self._tables = size, {}

    def table(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Return the (cached) noise table on ``device`` in ``dtype``.

        Args:
            device: Device of the table (default CPU).
            dtype: float32 or float64 (default float32; half types use a float32 table).

        Returns:
            1-D tensor of ``size`` standard normals.
        """
        device = torch.device(device if device is not None else "cpu")
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (str(device), dtype)
        if key not in self._tables:
            self._tables[key] = sample_normal(
                (self.size,), seed=self.seed, members=range(1), device=device, dtype=dtype
            )[0]
        return self._tables[key]

    def draw(
        self,
        shape: Sequence[int],
        *,
        step: int,
        leaf: int,
        members: range,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Return windows of the table as a strided view (see the class docstring).

        Args:
            shape: Shape of the parameter leaf.
            step: Estimate counter.
            leaf: Index of the parameter leaf.
            members: Population member indices (only their count and first index matter).
            device: Device of the result.
            dtype: Floating dtype of the result (half types get float32 rows).

        Returns:
            Tensor of shape ``(len(members), *shape)``, usually a view of the table.

        Raises:
            ValueError: If one parameter leaf has more elements than the table.
        """
        shape = tuple(shape)
        numel = math.prod(shape)
        rows = len(members)
        if numel > self.size:
            raise ValueError(
                f"NoiseTable(size={self.size}) is smaller than a parameter leaf with {numel} elements; "
                "use a larger `size`"
            )
        table = self.table(device, dtype)
        start = members[0] if rows else 0
        rng = random.Random(f"{self.seed}:{step}:{leaf}:{start}:{rows}")
        room = self.size - numel
        inner = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        if rows * numel <= self.size:
            # Consecutive windows from a random base: one contiguous block of the table, read at full speed.
            base = rng.randint(0, self.size - rows * numel)
            return table.as_strided((rows, *shape), (numel, *inner), base)
        max_stride = room // (rows - 1)
        if max_stride >= 1:
            # Not enough room for disjoint windows: overlapping ones with a random stride.
            stride = rng.randint(max(1, max_stride // 2), max_stride)
            base = rng.randint(0, room - (rows - 1) * stride)
            return table.as_strided((rows, *shape), (stride, *inner), base)
        # More rows than the table has room for: independent random offsets, copied.
        offsets = [rng.randint(0, room) for _ in range(rows)]
        return torch.stack([table[o : o + numel] for o in offsets]).view((rows, *shape))

    def __repr__(self) -> str:
        return f"NoiseTable(seed={self.seed}, size={self.size})"
