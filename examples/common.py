"""Small helpers shared by the examples: the digits data set, seeding, timing and result tables."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Digits",
    "Timer",
    "format_table",
    "limit_threads",
    "load_digits",
    "print_table",
    "seed_everything",
]


@dataclass
class Digits:
    """sklearn's 8x8 digits, split and scaled to [0, 1], as float32 tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_features(self) -> int:
        """Number of input features (64 pixels)."""
        return self.x_train.shape[1]

    num_classes: int = 10


def load_digits(test_size: float = 0.25, seed: int = 0) -> Digits:
    """Load sklearn's digits (1797 images, 10 classes, bundled with scikit-learn: no download).

    Args:
        test_size: fraction held out for testing (stratified).
        seed: seed of the split.

    Returns:
        A :class:`Digits` with pixels scaled to [0, 1].
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    x, y = _load(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    to_x = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return Digits(to_x(x_tr), to_y(y_tr), to_x(x_te), to_y(y_te))


@contextlib.contextmanager
def limit_threads(num_threads: int | None = None) -> Iterator[int]:
    """Run the block with ``num_threads`` intra-op threads (default 1, or ``$ALTGRAD_EXAMPLE_THREADS``).

    The examples work on small tensors, where torch's thread pool costs more than it gives; on a shared or busy
    machine a second thread can make each tiny operation ~10x slower. The previous setting is restored afterwards.
    """
    if num_threads is None:
        num_threads = int(os.environ.get("ALTGRAD_EXAMPLE_THREADS", "1"))
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        torch.set_num_threads(previous)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (model initialisation) and return a separate generator for data order."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1)


class Timer:
    """Context manager measuring wall time in seconds (``.seconds`` after the block, ``.elapsed`` inside it)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    @property
    def elapsed(self) -> float:
        """Seconds since the block started."""
        return time.perf_counter() - self.start

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render ``rows`` under ``headers`` as a Markdown table (floats with 4 significant digits)."""

    def cell(v: object) -> str:
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    table = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(r) for r in table)
    return "\n".join(out)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a titled Markdown table."""
    print(f"\n{title}\n\n{format_table(headers, rows)}\n", flush=True)
