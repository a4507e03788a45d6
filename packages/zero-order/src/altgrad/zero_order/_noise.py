"""Adapt any accepted ``distribution`` to one interface: draw the directions of a chunk of members for a leaf."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .distributions import NoiseTable, Samplable, SeededDistribution

if TYPE_CHECKING:
    from .directions import Workspace

__all__ = ["NoiseSource", "as_noise_source", "compute_dtype"]

_DISTRIBUTION_ERROR = "`distribution` must be a callable or an instance of `Samplable`."


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype noise, perturbations and gradient sums are computed in: at least float32."""
    return dtype if dtype == torch.float64 else torch.float32


def check_distribution(distribution: Any) -> None:
    """Raise TorchOpt's ``TypeError`` if ``distribution`` is neither Samplable nor callable."""
    if not isinstance(distribution, Samplable) and not callable(distribution):
        raise TypeError(_DISTRIBUTION_ERROR)


class NoiseSource:
    """Draws ``(len(members), *p.shape)`` directions for leaf ``leaf`` in the compute dtype on ``p``'s device.

    Args:
        distribution: A Samplable, a callable ``fn(sample_shape)`` or a `SeededDistribution`.
        sample_batched: Ask a user distribution for all members of a chunk in one call (``sample_shape=(n,
            *p.shape)``). When False, it is called once per member and leaf, as TorchOpt does.
    """

    def __init__(self, distribution: Any, sample_batched: bool = True) -> None:
        check_distribution(distribution)
        self.distribution = distribution
        self.sample_batched = sample_batched
        self.seeded = isinstance(distribution, SeededDistribution)
        # TorchOpt's rule: a `sample` attribute wins over being callable; a callable gets the shape positionally.
        self._sample: Callable[[torch.Size], Any]
        if isinstance(distribution, Samplable):
            self._sample = lambda shape: distribution.sample(sample_shape=shape)
        else:
            self._sample = distribution
        self._fast_normal = _scalar_normal(distribution)
        #: Set by the estimator while no drawn noise outlives its chunk: the fast normal path then draws into these
        #: reused buffers (one per leaf id) instead of fresh memory (new pages from the OS on every chunk).
        self.buffers: Workspace | None = None

    @property
    def regenerable(self) -> bool:
        """Whether drawing the same (step, leaf, members) again returns the same noise."""
        return self.seeded

    def new_step(self) -> int:
        """Start a new estimate and return its step (seeded distributions advance their counter)."""
        return self.distribution.next_step() if self.seeded else 0

    def mark(self) -> int:
        """The step counter before an estimate (see `rewind`); 0 for unseeded distributions."""
        return self.distribution.step if self.seeded else 0

    @contextlib.contextmanager
    def step_on_success(self) -> Iterator[None]:
        """Run an estimate that takes a step; if it fails (any exception, ``KeyboardInterrupt`` too), give it back."""
        mark = self.mark()
        try:
            yield
        except BaseException:
            self.rewind(mark)
            raise

    def rewind(self, mark: int) -> None:
        """Give back the step a failed estimate took: the counter returns to ``mark`` if the estimate advanced it
        by exactly one (an estimate running concurrently in another thread keeps its own step)."""
        if self.seeded and self.distribution.step == mark + 1:
            self.distribution.step = mark

    def draw(
        self,
        leaf: int,
        shape: Sequence[int],
        device: torch.device,
        param_dtype: torch.dtype,
        members: range,
        step: int,
    ) -> Tensor:
        """Return ``(len(members), *shape)`` noise for leaf ``leaf`` in the compute dtype on ``device``."""
        return self.draw_fresh(leaf, shape, device, param_dtype, members, step)[0]

    def draw_fresh(
        self,
        leaf: int,
        shape: Sequence[int],
        device: torch.device,
        param_dtype: torch.dtype,
        members: range,
        step: int,
    ) -> tuple[Tensor, bool]:
        """Like `draw`, also saying whether the tensor is new and private (safe to overwrite in place)."""
        dtype = compute_dtype(param_dtype)
        shape = torch.Size(shape)
        n = len(members)
        if self.seeded:
            z = self.distribution.draw(
                shape, step=step, leaf=leaf, members=members, device=device, dtype=dtype
            )
            return z, not isinstance(self.distribution, NoiseTable)
        if self._fast_normal is not None:
            loc, scale = self._fast_normal
            if self.buffers is None:
                z = torch.randn((n, *shape), device=device, dtype=dtype)
            else:  # the same numbers from the same generator, into reused memory
                z = torch.randn(
                    (n, *shape), out=self.buffers.scratch(("noise", leaf), (n, *shape), dtype, device)
                )
            if scale != 1.0:
                z.mul_(scale)
            if loc != 0.0:
                z.add_(loc)
            return z, True
        if self.sample_batched:
            raw = torch.as_tensor(self._sample(torch.Size((n, *shape))))
            if raw.shape == (n, *shape):
                z = raw.to(device=device, dtype=dtype)
                return z, z.data_ptr() != raw.data_ptr()
        rows = []
        for _ in range(n):
            z = torch.as_tensor(self._sample(shape))
            try:
                z = torch.broadcast_to(z, shape)
            except RuntimeError:
                raise ValueError(
                    f"`distribution` returned a sample of shape {tuple(z.shape)} for a parameter of shape "
                    f"{tuple(shape)}"
                ) from None
            rows.append(z.to(device=device, dtype=dtype))
        return torch.stack(rows), True


def _scalar_normal(distribution: Any) -> tuple[float, float] | None:
    """``(loc, scale)`` if ``distribution`` is a ``torch.distributions.Normal`` with scalar parameters.

    Such a distribution is sampled with one ``torch.randn`` on the parameter's device (2-3x faster than
    ``Normal.sample`` and never on the wrong device); the law is identical.
    """
    if type(distribution) is not torch.distributions.Normal:
        return None
    loc, scale = distribution.loc, distribution.scale
    if loc.numel() != 1 or scale.numel() != 1 or distribution.batch_shape != torch.Size():
        return None
    return float(loc), float(scale)


def as_noise_source(distribution: Any, sample_batched: bool = True) -> NoiseSource:
    """Wrap ``distribution`` (validated with TorchOpt's error) into a `NoiseSource`."""
    return NoiseSource(distribution, sample_batched=sample_batched)
