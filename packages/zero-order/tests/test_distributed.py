"""process_group (issue 13 §3): 2 gloo ranks give every rank the same gradient as the single-process estimate."""

import sys

import _bounds
import _dist_worker as w
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import altgrad.zero_order as zo
from altgrad.zero_order import estimate_gradient, zero_order

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(w.run, args=(2, str(tmp)), nprocs=2, join=True)  # one spawn runs every case
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _bound(method, top_k=None, z=None):
    # Members are evaluated in different batches (rank blocks vs single-process chunks): each value is within the
    # _bounds γ-bound of its exact value; the accumulation adds γ_{N+C+4} terms on each side.
    params = w.mlp_params()
    x, y = w.data()
    if z is None:
        z = [
            zo.SeededNormal(4).draw(p.shape, step=0, leaf=i, members=range(w.N)) for i, p in enumerate(params)
        ]
    fp, bp = _bounds.mlp_loss_and_bound([p + w.SIGMA * zi for p, zi in zip(params, z)], x, y, torch.float32)
    fm, bm = _bounds.mlp_loss_and_bound([p - w.SIGMA * zi for p, zi in zip(params, z)], x, y, torch.float32)
    f0, b0 = _bounds.mlp_loss_and_bound([p.unsqueeze(0) for p in params], x, y, torch.float32)
    return _bounds.estimate_difference_bound(
        method,
        params,
        z,
        w.SIGMA,
        fp,
        bp,
        fm,
        bm,
        num_chunks=8,
        top_k=top_k,
        f0=f0.item(),
        f0_bound=b0.item(),
    )


@pytest.mark.parametrize("method", zo.METHODS)
def test_every_method_matches_single_process(ranks, method):
    single, multi0 = ranks[0][("estimate_gradient", method)]
    _, multi1 = ranks[1][("estimate_gradient", method)]
    for a, b in zip(multi0, multi1):
        assert torch.equal(a, b)  # exact: every rank the same ops on the same gathered values
    for a, s, bd in zip(multi0, single, _bound(method, 5 if method == "ars" else None)):
        _bounds.assert_within(a, s, bd)


@pytest.mark.parametrize("directions", ["lowrank", "flipout"])
def test_structured_directions_match_single_process(ranks, directions):
    # Flipout's shared S and the low-rank factors are regenerated identically by every rank and every chunk.
    single, multi0 = ranks[0][("estimate_gradient", directions)]
    _, multi1 = ranks[1][("estimate_gradient", directions)]
    x, y = w.data()
    params = w.mlp_params()
    if directions == "lowrank":
        bound = _bounds.lowrank_estimate_bound(params, x, y, w.N, w.SIGMA, 2, 4, num_chunks=8)
    else:
        bound = _bounds.flipout_estimate_bound(params, x, y, w.N, w.SIGMA, 4, num_chunks=8)
    for a, b, s, bd in zip(multi0, multi1, single, bound):
        assert torch.equal(a, b)  # exact: every rank the same ops on the same gathered values
        _bounds.assert_within(a, s, bd)


@pytest.mark.parametrize("api", ["zero_order", "module"])
def test_decorator_and_module(ranks, api):
    single, _ = ranks[0][("estimate_gradient", "antithetic")]
    g0 = ranks[0][(api, "antithetic")][1]
    g1 = ranks[1][(api, "antithetic")][1]
    for a, b, s, bd in zip(g0, g1, single, _bound("antithetic")):
        assert torch.equal(a, b)  # exact: every rank the same ops on the same gathered values
        _bounds.assert_within(a, s, bd)


def test_bad_input_is_refused_on_every_rank(ranks):
    for out in ranks:
        assert out["user-distribution"].startswith("ValueError")
        assert "seeded distribution" in out["user-distribution"]
        assert out["module-user-distribution"].startswith("ValueError")
        assert out["mismatch"].startswith("ValueError")
        assert "num_samples differs" in out["mismatch"]
        assert "[6, 8]" in out["mismatch"]
        assert out["empty"].startswith("ValueError")
        assert "without members" in out["empty"]


def test_noise_table_matches_single_process(ranks):
    # Windows of a NoiseTable are keyed by the single process's chunks: every rank evaluates those directions.
    single, multi0 = ranks[0][("estimate_gradient", "noise-table")]
    _, multi1 = ranks[1][("estimate_gradient", "noise-table")]
    params = w.mlp_params()
    table = zo.NoiseTable(4, size=1 << 10)
    per_chunk = w.TABLE_CHUNK // 2  # antithetic: two rows per direction
    z = [
        torch.cat(
            [
                table.draw(p.shape, step=0, leaf=i, members=range(s, min(w.N, s + per_chunk)))
                for s in range(0, w.N, per_chunk)
            ]
        )
        for i, p in enumerate(params)
    ]
    for a, b, s, bd in zip(multi0, multi1, single, _bound("antithetic", z=z)):
        assert torch.equal(a, b)  # exact: every rank the same ops on the same gathered values
        _bounds.assert_within(a, s, bd)


@pytest.mark.parametrize("name", ["directions", "rank", "top_k", "grad_output"])
def test_settings_that_differ_are_refused_on_every_rank(ranks, name):
    for out in ranks:
        assert out[("differs", name)] is not None
        assert out[("differs", name)].startswith(f"ValueError: {name} differs across the ranks")


def test_a_rank_failing_mid_estimate_stops_every_rank_and_consumes_nothing(ranks):
    assert ranks[1]["failed"] == "ValueError: bad batch"  # the failing rank re-raises its own error
    assert ranks[0]["failed"].startswith("RuntimeError: rank(s) [1] of `process_group` failed")
    for out in ranks:
        assert out["failed-step"] == 0  # the failed estimate gave its step back
        assert out["retry-step"] == 1
    uninterrupted = ranks[0][("estimate_gradient", "antithetic")][1]
    for out in ranks:
        for a, b in zip(out["retry"], uninterrupted):
            assert torch.equal(a, b)  # exact: the same estimate (step 0, same values), the same route


def test_messages_out_of_step_are_never_paired(ranks):
    for out in ranks:
        assert out["out-of-step"].startswith("RuntimeError: the ranks of `process_group` are out of step")
        assert "rank 0: its values of estimate 0" in out["out-of-step"]
        assert "rank 1: its settings of estimate 0" in out["out-of-step"]


def test_process_group_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"process_group.*ProcessGroup.*got str"):
        zero_order(zo.SeededNormal(0), process_group="world")
    with pytest.raises(TypeError, match="process_group"):
        estimate_gradient(lambda t: t.sum(), [torch.zeros(2)], zo.SeededNormal(0), process_group=1)
    with pytest.raises(TypeError, match="process_group"):

        class Bad(w.Net, process_group=object()):
            pass
