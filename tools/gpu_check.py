"""Check every CUDA path of altgrad on a machine with an NVIDIA GPU, in one command and bounded time (issue 16).

Steps, each with its own timeout inside a total budget (``--budget``, default 450 s, so the whole run stays within
8 minutes):

1. ``.whl/*.whl`` (if present; ``tools/gpu_wheels.sh`` downloads them) are unpacked into a private site directory
   that every later step sees through ``PYTHONPATH``: the GPU machine has no internet.
2. Every package is built and installed into a private ``--target`` directory with
   ``pip install --no-build-isolation --no-deps --no-index`` (the build needs scikit-build-core, pybind11,
   setuptools-scm and cmake in this Python); discounted-cumsum with ``ALTGRAD_CUDA=1`` for this GPU
   (``ALTGRAD_CUDA_ARCHITECTURES=native``, or ``--cuda-arch``). The CUDA module must then import.
3. Every package's CUDA tests (``packages/<pkg>/tests/test_cuda*.py``) run against that install.
4. Every benchmark whose ``run.py`` takes ``--device`` runs with ``--device cuda --quick``, writing JSON and a plot.

All results go to ``--out``: ``summary.json`` (GPU, versions, every step's status, test counts and failures,
wall times), ``bench-<pkg>.json``/``.png`` and ``gpu_check.log`` (every command's output), at most 8 files.
Exit status 0 only when every step passed.

Without a GPU the script prints one line and exits with status 2. ``--dry-run`` runs the same steps on the CPU
instead: the CUDA build for sm_90 with nvcc, the CUDA test files (they skip), the benchmarks with ``--device cpu``.

Usage (plain Python, no nox needed; ``nox -s gpu`` calls this)::

    python3 tools/gpu_check.py --out build/gpu [--dry-run] [--budget 450]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPS = {"wheels": 60, "build": 240, "tests": 150, "bench": 120}  # seconds, each further capped by the budget
DRY_BENCH_CAP = 300  # CPU benchmarks on a small machine are slower than the GPU ones
MIN_STEP_S = 10  # a step that would get less than this is not started


class Runner:
    """Runs the steps under one deadline, logs every command's output, and collects the summary."""

    def __init__(self, out: Path, budget: float, env: dict[str, str]) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget
        self.env = env
        self.log = (out / "gpu_check.log").open("w")
        self.steps: list[dict] = []

    def run(self, name: str, cmd: list[str], cap: float, cwd: Path = ROOT, env: dict | None = None) -> dict:
        step: dict = {"step": name, "cmd": " ".join(cmd)}
        self.steps.append(step)
        left = self.deadline - time.monotonic()
        if left < MIN_STEP_S:
            step.update(ok=False, status="not run: out of time")
            print(f"[gpu_check] {name}: not run, out of time", flush=True)
            return step
        timeout = min(cap, left)
        print(f"[gpu_check] {name} (timeout {timeout:.0f} s) ...", flush=True)
        self.log.write(f"\n===== {name}: {step['cmd']}\n")
        self.log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**self.env, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
            step.update(rc=rc, ok=rc == 0, status="passed" if rc == 0 else f"failed (exit {rc})")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            step.update(rc=None, ok=False, status=f"failed: timed out after {timeout:.0f} s")
        step["wall_s"] = round(time.monotonic() - start, 1)
        print(f"[gpu_check] {name}: {step['status']} in {step['wall_s']} s", flush=True)
        return step


def _junit_summary(path: Path) -> dict:
    """Counts, failures and skip reasons from a pytest JUnit XML file."""
    if not path.is_file():
        return {"error": "no JUnit report written"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            reason = (case.find("skipped").get("message") or "")[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures[:20], "skip_reasons": skips}


def _environment(torch, dry_run: bool) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "dry_run": dry_run,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=props.total_memory / 2**30,
        )
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
        release = [line for line in out.splitlines() if "release" in line]
        info["nvcc"] = release[0].strip() if release else nvcc
    return info


def _compatible(wheels: list[Path]) -> list[Path]:
    """The wheels this interpreter can install (``.whl/`` is made for the GPU machine's Python 3.12)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # pip always carries a copy
        from pip._vendor.packaging.tags import sys_tags
        from pip._vendor.packaging.utils import parse_wheel_filename

    supported = set(sys_tags())
    return [w for w in wheels if parse_wheel_filename(w.name)[3] & supported]


def _has_device_option(run_py: Path) -> bool:
    return '"--device"' in run_py.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for summary.json, benchmark JSON and log"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="run the CPU-side checks on the CPU (no GPU needed)"
    )
    parser.add_argument(
        "--budget", type=float, default=450.0, help="total seconds for all steps (default 450)"
    )
    parser.add_argument(
        "--cuda-arch", default=None, help="ALTGRAD_CUDA_ARCHITECTURES (default: native; 90-real dry)"
    )
    parser.add_argument(
        "--wheels", type=Path, default=ROOT / ".whl", help="wheels to unpack first (default .whl/)"
    )
    parser.add_argument("--packages", nargs="*", default=None, help="only these packages (directory names)")
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA GPU visible to torch {torch.__version__}: nothing checked "
            "(run it on a GPU machine, or with --dry-run for the CPU-side checks)",
            file=sys.stderr,
        )
        return 2

    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="altgrad-gpu-"))
    site, wheel_site = work / "site", work / "wheel-site"
    pythonpath = [
        str(site),
        str(wheel_site),
        *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), "PYTHONUNBUFFERED": "1"}
    env.pop("ALTGRAD_CPU_ISA", None)
    runner = Runner(out, args.budget, env)
    summary: dict = {"environment": _environment(torch, args.dry_run), "steps": runner.steps}
    py = sys.executable
    packages = sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml"))
    if args.packages:
        packages = [p for p in packages if p in args.packages]

    wheels = _compatible(sorted(args.wheels.glob("*.whl"))) if args.wheels.is_dir() else []
    if wheels:
        pip = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        runner.run(
            "wheels", [*pip, "--upgrade", "--target", str(wheel_site), *map(str, wheels)], CAPS["wheels"]
        )

    arch = args.cuda_arch or ("90-real" if args.dry_run else "native")
    build_env = {
        "ALTGRAD_CUDA": "1",
        "ALTGRAD_CUDA_ARCHITECTURES": arch,
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        "SKBUILD_BUILD_DIR": str(work / "cmake-build"),  # not the source tree's build/
        # The GPU machine's copy of the tree has no .git, so versions are 0.0.0 there; the same here keeps a
        # commit that lands mid-build from failing pip's check that the wheel matches its metadata.
        "SETUPTOOLS_SCM_PRETEND_VERSION": "0.0.0",
    }
    pip = [
        py,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-build-isolation",
        "--no-deps",
        "--no-index",
        "--no-cache-dir",
    ]
    build = runner.run(
        f"build (ALTGRAD_CUDA=1, architectures {arch})",
        [*pip, "--target", str(site), *(str(ROOT / "packages" / p) for p in packages)],
        CAPS["build"],
        env=build_env,
    )
    if build["ok"] and "discounted-cumsum" in packages:
        probe = (
            "from altgrad.discounted_cumsum import _native as n; "
            "assert n.cuda_available(), n._cuda_error; print('CUDA module imported:', n._cuda.__file__)"
        )
        runner.run("CUDA module imports", [py, "-c", probe], 60, cwd=work)

    if build["ok"]:
        run_dir = work / "run"  # the source tree is not importable from here
        run_dir.mkdir()
        for pkg in packages:
            tests = sorted((ROOT / "packages" / pkg / "tests").glob("test_cuda*.py"))
            if not tests:
                continue
            junit = work / f"junit-{pkg}.xml"
            cmd = [py, "-m", "pytest", *map(str, tests), "-q", "-p", "no:cacheprovider"]
            cmd += ["--rootdir", str(ROOT / "packages" / pkg), f"--junitxml={junit}"]
            step = runner.run(f"tests {pkg}", cmd, CAPS["tests"], cwd=run_dir)
            step["tests"] = _junit_summary(junit)
            if not args.dry_run and step["tests"].get("skipped"):
                step.update(ok=False, status=step["status"] + "; tests skipped on a GPU machine")

        device = "cpu" if args.dry_run else "cuda"
        for pkg in packages:
            run_py = ROOT / "packages" / pkg / "benchmarks" / "run.py"
            if not run_py.is_file() or not _has_device_option(run_py):
                continue
            json_out, png_out = out / f"bench-{pkg}.json", out / f"bench-{pkg}.png"
            cmd = [
                py,
                str(run_py),
                "--device",
                device,
                "--quick",
                "--out",
                str(json_out),
                "--plot",
                str(png_out),
            ]
            cap = DRY_BENCH_CAP if args.dry_run else CAPS["bench"]
            step = runner.run(f"bench {pkg} ({device})", cmd, cap, cwd=run_dir)
            if step["ok"]:
                try:
                    json.loads(json_out.read_text())
                    step["json"] = json_out.name
                except (OSError, ValueError) as exc:
                    step.update(ok=False, status=f"failed: no valid JSON ({exc})")

    summary["ok"] = bool(runner.steps) and all(s["ok"] for s in runner.steps)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    runner.log.close()
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"[gpu_check] {'PASSED' if summary['ok'] else 'FAILED'} in {summary['wall_s']} s; see {out}/summary.json"
    )
    for s in runner.steps:
        print(f"  {s['step']:<45} {s['status']:<40} {s.get('wall_s', '')}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
