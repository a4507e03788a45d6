"""The examples in ``examples/`` compose the installed packages; their short versions must show real learning.

Each example's ``main(quick=True)`` runs once per module (a few seconds each) and the tests assert, with stated
margins, that learning happened: losses fall, accuracies clear chance (0.10 for ten digit classes) by a wide
margin, the CartPole return at least doubles. The example files are read from the repository (they are not
installed); the packages they import are the installed wheels.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CHANCE = 0.10  # ten balanced classes


def _load(name: str) -> types.ModuleType:
    """Import ``examples/<name>.py`` by path (its siblings ``common``/``envs`` resolve through ``sys.path``)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    module_name = f"altgrad_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None, f"cannot load {name}.py from {EXAMPLES}"
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def es_result():
    return _load("es_cartpole").main(quick=True, seed=0)


@pytest.fixture(scope="module")
def zero_order_result():
    return _load("zero_order_digits").main(quick=True, seed=0)


@pytest.fixture(scope="module")
def dni_result():
    return _load("dni_digits").main(quick=True, seed=0)


# ------------------------------------------------------------------ the environment


def _reference_step(s: list[float], action: int) -> list[float]:
    """Gymnasium's CartPole-v1 ``step`` for one state, in plain Python floats (an independent re-implementation)."""
    x, x_dot, theta, theta_dot = s
    force = 10.0 if action == 1 else -10.0
    cos, sin = math.cos(theta), math.sin(theta)
    temp = (force + 0.05 * theta_dot**2 * sin) / 1.1
    thetaacc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos**2 / 1.1))
    xacc = temp - 0.05 * thetaacc * cos / 1.1
    return [x + 0.02 * x_dot, x_dot + 0.02 * xacc, theta + 0.02 * theta_dot, theta_dot + 0.02 * thetaacc]


def test_batched_cartpole_matches_gymnasium_dynamics():
    envs = _load("envs")
    env = envs.BatchedCartPole(8, seed=3, dtype=torch.float64)
    obs = env.reset()
    assert obs.abs().max() <= 0.05
    ref = [row.tolist() for row in obs]
    ref_alive = [True] * 8
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        action = torch.randint(0, 2, (8,), generator=gen)
        obs, reward, done = env.step(action)
        for i in range(8):
            expected_reward = 1.0 if ref_alive[i] else 0.0
            assert reward[i].item() == expected_reward  # exact: rewards are the constants 1.0 / 0.0
            if ref_alive[i]:
                ref[i] = _reference_step(ref[i], int(action[i]))
                ref_alive[i] = abs(ref[i][0]) <= 2.4 and abs(ref[i][2]) <= 12 * 2 * math.pi / 360
            assert done[i].item() == (not ref_alive[i])  # exact: bool
        torch.testing.assert_close(obs, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_batched_cartpole_random_policy_and_time_limit():
    envs = _load("envs")
    env = envs.BatchedCartPole(2000, seed=0)
    env.reset()
    total = torch.zeros(2000)
    gen = torch.Generator().manual_seed(1)
    while not env.all_done:
        _, reward, _ = env.step(torch.randint(0, 2, (2000,), generator=gen))
        total += reward
    assert 19.0 < total.mean().item() < 26.0  # a random policy scores about 22 on CartPole-v1
    # A good hand-written controller is stopped by the 500-step limit.
    env = envs.BatchedCartPole(16, seed=0)
    obs = env.reset()
    total = torch.zeros(16)
    while not env.all_done:
        obs, reward, _ = env.step((obs[:, 2] + obs[:, 3] + 0.1 * obs[:, 1] > 0).long())
        total += reward
    assert env.steps == 500
    assert total.max().item() == 500.0  # exact: integer-valued (a sum of 500 ones)


# ------------------------------------------------------------------ ES on CartPole


def test_es_cartpole_return_improves(es_result):
    initial, final = es_result["initial_return"], es_result["final_return"]
    # Margin: the 100-episode evaluation mean at least doubles and reaches 100 (a random policy scores ~22).
    assert final >= max(2 * initial, 100.0), es_result["summary"]
    first, last = es_result["generations"][0], es_result["generations"][-1]
    assert last["policy_return"] > first["policy_return"] + 50
    assert es_result["passed"]


def test_evotorch_pgpe_on_es_layers_evaluation_improves():
    pytest.importorskip("evotorch")  # installed by the integration and demo sessions
    result = _load("es_evotorch_pgpe").main(quick=True, seed=0)
    # Margin: as for the ES example, the 100-episode evaluation mean at least doubles and reaches 100.
    assert result["final_return"] >= max(2 * result["initial_return"], 100.0), result["summary"]
    assert result["passed"]


# ------------------------------------------------------------------ zero-order vs backprop


def test_zero_order_digits_learns(zero_order_result):
    zo, bp = zero_order_result["runs"]
    assert zo["method"] == "zero-order"
    assert bp["method"] == "backprop"
    # Loss falls by at least 25% with gradients estimated from loss values only.
    assert zo["final_loss"] < 0.75 * zo["initial_loss"], zo
    # Accuracy clears chance (0.10) by at least 0.40 for zero-order and 0.70 for backprop.
    assert zo["test_acc"] >= CHANCE + 0.40, zo["test_acc"]
    assert bp["test_acc"] >= CHANCE + 0.70, bp["test_acc"]
    assert bp["final_loss"] < 0.5 * bp["initial_loss"]
    assert zo["forward_evals_per_step"] > 1  # it really was a zero-order estimate
    assert zero_order_result["passed"]


# ------------------------------------------------------------------ DNI


def test_dni_digits_learns_with_synthetic_gradients(dni_result):
    runs = {r["method"]: r for r in dni_result["runs"]}
    assert set(runs) == {"backprop", "DNI", "cDNI", "frozen"}
    for name in ("backprop", "DNI", "cDNI"):
        r = runs[name]
        assert r["final_loss"] < 0.5 * r["initial_loss"], (name, r["initial_loss"], r["final_loss"])
        assert r["test_acc"] >= CHANCE + 0.40, (name, r["test_acc"])
    # The hidden blocks were trained by their synthetic gradients (they moved, and they beat frozen random
    # features by a clear margin in training loss).
    for name in ("DNI", "cDNI"):
        assert runs[name]["first_layer_change"] > 0.02, (name, runs[name]["first_layer_change"])
        assert runs[name]["final_loss"] < 0.8 * runs["frozen"]["final_loss"], name
    assert runs["frozen"]["first_layer_change"] == 0.0  # exact: untouched (frozen weights)
    assert dni_result["passed"]


# ------------------------------------------------------------------ zero-order LoRA fine-tuning of a transformers LM


def test_zero_order_lora_lm_fine_tunes_adapters_only():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    result = _load("zero_order_lora_lm").main(quick=True, seed=0)
    # ZO-SGD on the LoRA adapters only: the held-out loss on the new task falls below 0.7 of its start (it starts
    # near 7 after pretraining on another task; 100 quick steps reach about 2.4)
    assert result["final_loss"] < 0.7 * result["initial_loss"], result["losses"]
    assert result["trainable"]
    assert all("lora_" in name for name in result["trainable"])
    assert result["frozen_unchanged"]
    assert result["no_grad"]
    assert result["passed"]


# ------------------------------------------------------------------ RL advantages on a gymnasium rollout


def test_rl_advantages_cartpole_match_torchrl_and_a_float64_loop():
    pytest.importorskip("gymnasium")  # installed by the integration and demo sessions
    pytest.importorskip("torchrl")
    result = _load("rl_advantages_cartpole").main(quick=True, seed=0)
    for name, diff in result["max_diff"].items():
        assert diff <= result["bound"][name], (name, diff, result["bound"][name])
    # both kinds of episode end occur in the rollout, as gymnasium reported them
    assert result["episodes_terminated"] > 0
    assert result["episodes_truncated"] > 0
    assert result["passed"], result["summary"]
    # An independent float64 loop over the rollout: a terminated step drops the bootstrap, a truncated one
    # bootstraps from its own next value, and nothing crosses an episode end.
    roll = result["rollout"]
    r, v, nv = (roll[k].double() for k in ("rewards", "values", "next_values"))
    done, term = roll["dones"], roll["terminated"]
    gamma, lam = 0.99, 0.95
    adv = torch.zeros_like(r)
    ret = torch.zeros_like(r)
    gae = torch.zeros(r.shape[1], dtype=torch.float64)
    g = torch.zeros(r.shape[1], dtype=torch.float64)
    for t in reversed(range(r.shape[0])):
        boot = torch.where(term[t], 0.0, nv[t])
        gae = r[t] + gamma * boot - v[t] + gamma * lam * torch.where(done[t], 0.0, gae)
        last = t == r.shape[0] - 1
        g = r[t] + gamma * ((1 - lam) * boot + lam * (boot if last else torch.where(done[t], boot, g)))
        adv[t], ret[t] = gae, g
    # The kernel carries float32 inputs in float64 and rounds once to float32 at the end: error <= eps32 of the
    # magnitude, doubled for margin (the float64 loop's own error is ~1e-14).
    eps32 = torch.finfo(torch.float32).eps
    torch.testing.assert_close(
        result["advantages"].double(), adv, rtol=0, atol=2 * eps32 * max(1.0, adv.abs().max().item())
    )
    torch.testing.assert_close(
        result["td_lambda_returns"].double(), ret, rtol=0, atol=2 * eps32 * max(1.0, ret.abs().max().item())
    )


# ------------------------------------------------------------------ run_all


def test_run_all_reports_failures(monkeypatch, capsys):
    run_all = _load("run_all")
    crashing = types.ModuleType("altgrad_example_crashing")

    def crash(quick: bool = False, seed: int = 0) -> dict:
        raise RuntimeError("boom")

    crashing.main = crash
    monkeypatch.setitem(sys.modules, "altgrad_example_crashing", crashing)
    (result,) = run_all.run(("altgrad_example_crashing",), quick=True)
    assert result["passed"] is False
    assert "boom" in result["summary"]

    fake = [{"name": "x", "summary": "s", "target": "t", "passed": False, "wall_seconds": 0.0}]
    monkeypatch.setattr(run_all, "run", lambda *a, **k: fake)
    assert run_all.main(["--quick"]) == 1
    fake[0]["passed"] = True
    assert run_all.main(["--quick"]) == 0
    assert "1/1 examples met their targets" in capsys.readouterr().out
