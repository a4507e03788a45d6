#!/usr/bin/env bash
# Download into .whl/ the wheels that tools/gpu_check.py needs on the GPU machine, which has no internet
# (see docs/development.md, "GPU check"). That machine (Python 3.12, torch 2.11) already has pybind11,
# scikit-build-core, cmake, ninja, pytest, hypothesis, numpy, scipy, matplotlib and setuptools; missing are
# setuptools-scm (+ vcs-versioning, and the packaging it needs) for the builds, a setuptools new enough for
# PEP 639 license strings, and TorchOpt (+ optree) for the zero-order peer benchmark.
# .whl/ is ignored through .git/info/exclude; the device call carries it (carry: [".whl"]), and the tree
# plus the wheels must stay under the device tool's 64 MiB, which this script checks.
set -euo pipefail
cd "$(dirname "$0")/.."

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

WHEELS=(
  "setuptools-scm==10.3.4" "vcs-versioning==2.6.0" "packaging==26.4" "setuptools==84.2.1"
  "torchopt==0.7.3" "optree==0.20.0"
)
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

# One version of each (two stop the whole install), and the size limit of what travels.
dupes="$(ls .whl | sed -E 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
[ -z "$dupes" ] || { echo "gpu_wheels: more than one version of: $dupes" >&2; exit 1; }
limit=$((64 * 1024 * 1024))
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((wheels + tree))
echo "gpu_wheels: $(ls .whl | wc -l) wheels, $((wheels / 1024)) KiB; tree $((tree / 1024)) KiB; total $((total / 1024)) KiB of $((limit / 1024)) KiB"
[ "$total" -lt "$limit" ] || { echo "gpu_wheels: tree + wheels exceed the device tool's 64 MiB" >&2; exit 1; }
