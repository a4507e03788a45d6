"""Run every example (the ``nox -s demo`` job), print a summary table, exit non-zero if one misses its target.

Examples, in order:

* ``es_cartpole``: evolution strategies solve CartPole-v1 (es-layers + discounted-cumsum + sign-optim AddSign);
* ``es_evotorch_pgpe``: EvoTorch's PGPE (ask/tell, adapted σ) solves CartPole-v1 on es-layers' batched evaluation;
* ``zero_order_digits``: a digits classifier trained with zero-order gradients (zero-order + sign-optim PowerSign),
  next to backprop + Adam;
* ``zero_order_lora_lm``: a ``transformers`` GPT-2 (from a config) fine-tuned through a ``peft`` LoRA with zero-order
  SGD at inference memory (zero-order's ``ZOSGD``);
* ``dni_digits``: backprop vs DNI vs cDNI on digits (dni);
* ``rl_advantages_cartpole``: PPO's GAE and TD(λ) returns on a gymnasium CartPole-v1 rollout (terminated and
  truncated episode ends) with discounted-cumsum's fused estimators, checked against TorchRL's functions.

Usage: ``python examples/run_all.py [--quick] [--only NAME ...] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table

EXAMPLES = (
    "es_cartpole",
    "es_evotorch_pgpe",
    "zero_order_digits",
    "zero_order_lora_lm",
    "dni_digits",
    "rl_advantages_cartpole",
)


def run(names: tuple[str, ...] = EXAMPLES, quick: bool = False, seed: int = 0) -> list[dict]:
    """Import and run each example's ``main``; a crash is recorded as a failed result instead of stopping the run."""
    results = []
    for name in names:
        print(f"\n{'=' * 100}\n== {name}{' (quick)' if quick else ''}\n{'=' * 100}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
            result = module.main(quick=quick, seed=seed)
        except Exception as exc:
            traceback.print_exc()
            result = {"name": name, "passed": False, "target": "-", "summary": f"crashed: {exc!r}"}
        result["wall_seconds"] = time.perf_counter() - start
        results.append(result)
    return results


def _json_safe(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 when every example met its target)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the short versions (as in the integration tests)"
    )
    parser.add_argument("--only", nargs="+", choices=EXAMPLES, default=list(EXAMPLES), help="examples to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    results = run(tuple(args.only), quick=args.quick, seed=args.seed)
    total = time.perf_counter() - start
    print_table(
        f"altgrad demo: {sum(r['passed'] for r in results)}/{len(results)} examples met their targets "
        f"({total:.0f} s in all)",
        ["example", "result", "target", "met", "s"],
        [[r["name"], r["summary"], r["target"], r["passed"], r["wall_seconds"]] for r in results],
    )
    if args.json:
        args.json.write_text(json.dumps(_json_safe(results), indent=1))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
