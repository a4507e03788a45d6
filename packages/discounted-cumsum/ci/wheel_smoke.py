"""Smoke test of an installed altgrad-discounted-cumsum wheel (cibuildwheel's test-command, and `nox -s release`).

Run it from a directory where the source tree is not importable: it checks that the compiled CPU module loaded
(a wheel whose extension failed to import must not pass by falling back to pure torch), that the kernel picked for
this CPU suits the platform, and that forward values and gradients match a float64 loop within an error bound.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

import altgrad.discounted_cumsum as dc

N = 1000  # sequence length; the error bound below grows with it


def loop_right(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_t = x_t + gamma * y_{t+1} along the last dim, in float64, one step at a time."""
    x = x.double()
    y = torch.empty_like(x)
    acc = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for t in range(x.shape[-1] - 1, -1, -1):
        acc = x[..., t] + gamma * acc
        y[..., t] = acc
    return y


def check_close(name: str, got: torch.Tensor, x: torch.Tensor, gamma: float, eps: float) -> None:
    # Any evaluation order of a sum of N products gamma^k * x_{t+k} (each product with at most N roundings) is
    # within 2 * N * eps * sum |gamma^k x_{t+k}| of the exact value (Higham, Accuracy and Stability, ch. 4);
    # the float64 loop is itself within N * 2^-53 * the same sum, negligible against float32 eps and covered
    # by the factor 2 for float64.
    bound = 2 * N * eps * loop_right(x.abs(), abs(gamma))
    err = (got.double() - loop_right(x, gamma)).abs()
    if not bool((err <= bound).all()):
        raise SystemExit(
            f"FAIL {name}: max error {err.max().item():.3g} exceeds the bound {bound.max().item():.3g}"
        )
    print(
        f"ok {name}: max error {err.max().item():.3g} (bound {bound.min().item():.3g}..{bound.max().item():.3g})"
    )


def main() -> None:
    version = importlib.metadata.version("altgrad-discounted-cumsum")
    print(
        f"altgrad-discounted-cumsum {version} on Python {sys.version.split()[0]}, torch {torch.__version__},"
    )
    print(f"  {platform.system()} {platform.machine()}; module {dc.__file__}")
    if dc.__version__ != version:
        raise SystemExit(f"FAIL: __version__ {dc.__version__} != installed metadata {version}")
    if not dc.cpu_available():
        raise SystemExit("FAIL: the compiled CPU module did not load (see altgrad.discounted_cumsum._native)")
    isa = dc.cpu_isa()
    machine = platform.machine().lower()
    x86 = machine in {"x86_64", "amd64", "i386", "i686"}
    allowed = {"baseline", "avx2", "avx512"} if x86 else {"baseline"}
    if isa not in allowed:
        raise SystemExit(f"FAIL: cpu_isa() is {isa!r} on {machine}; expected one of {sorted(allowed)}")
    print(f"  CPU kernel: {isa}")

    gen = torch.Generator().manual_seed(0)
    gamma = 0.99
    for dtype, eps in ((torch.float64, 2.0**-53), (torch.float32, 2.0**-24)):
        x = torch.randn(3, N, generator=gen, dtype=dtype)
        check_close(f"right {dtype}", dc.discounted_cumsum_right(x, gamma), x, gamma, eps)
        # left along the sequence is right along the flipped sequence
        left = dc.discounted_cumsum_left(x, gamma)
        check_close(f"left {dtype}", left.flip(-1), x.flip(-1), gamma, eps)

    # Gradient: d/dx sum(w * right(x)) = left(w), i.e. the right-sum of the flipped weights, flipped back.
    x = torch.randn(3, N, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, N, generator=gen, dtype=torch.float64)
    (dc.discounted_cumsum_right(x, gamma) * w).sum().backward()
    assert x.grad is not None
    check_close("grad x", x.grad.flip(-1), w.flip(-1), gamma, 2.0**-53)
    print("wheel smoke test passed")


if __name__ == "__main__":
    main()
