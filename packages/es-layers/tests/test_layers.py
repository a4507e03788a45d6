"""Every layer type: batched forward and update against explicit per-member loops; structure of E_k; state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import altgrad.es_layers as es

N = 6


def _forward(layer, x):
    layer.perturbed_flag = True
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.perturbed_flag = False


@pytest.mark.parametrize("repeats", [1, 2, 4])
def test_forward_matches_per_member_loop(case, repeats, make_x, reference):
    _, factory = case
    layer = factory()
    layer.set_noise(0.1)
    x = make_x(layer, repeats)
    torch.testing.assert_close(_forward(layer, x), reference(layer, x), rtol=1e-10, atol=1e-10)


def test_forward_without_antithetic_odd_repeats(case, make_x, reference):
    _, factory = case
    layer = factory()
    layer.antithetic = False
    layer.set_noise(0.1)
    x = make_x(layer, 3)
    torch.testing.assert_close(_forward(layer, x), reference(layer, x), rtol=1e-10, atol=1e-10)


def test_antithetic_layout(case, make_x):
    # second half of the repeats sees -E_k: y(+) - y(0) == -(y(-) - y(0)) for the same input and member
    _, factory = case
    layer = factory()
    layer.set_noise(0.1)
    x1 = make_x(layer, 1)
    x = torch.cat([x1, x1])
    y = _forward(layer, x)
    with torch.no_grad():
        base = layer(x1)
    torch.testing.assert_close(y[:N] - base, -(y[N:] - base), rtol=1e-9, atol=1e-12)
    assert (y[:N] - base).abs().max() > 1e-4


def test_update_matches_explicit_sum(case):
    _, factory = case
    layer = factory()
    layer.set_noise(0.1)
    w = torch.randn(N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    dense_w, dense_b = layer.dense_noise()
    ref_w = sum(w[k] * dense_w[k] for k in range(N))
    layer.set_grad(w)
    torch.testing.assert_close(layer.weight.grad, ref_w, rtol=1e-10, atol=1e-12)
    if layer.bias is not None:
        ref_b = sum(w[k] * dense_b[k] for k in range(N))
        torch.testing.assert_close(layer.bias.grad, ref_b, rtol=1e-10, atol=1e-12)
    # update() accumulates, set_grad() overwrites; l1/l2 act on the weight
    layer.update(w, l1=0.5, l2=0.25)
    expected = 2 * ref_w + 0.5 * torch.sign(layer.weight) + 0.25 * layer.weight
    torch.testing.assert_close(layer.weight.grad, expected.detach(), rtol=1e-10, atol=1e-12)
    layer.set_grad(w)
    torch.testing.assert_close(layer.weight.grad, ref_w, rtol=1e-10, atol=1e-12)


def test_update_is_regenerated_after_free_memory(case):
    _, factory = case
    layer = factory()
    layer.set_noise()
    w = torch.linspace(-1, 1, N, dtype=torch.float64)
    g1 = layer.es_grad(w)
    assert layer.noise_memory_bytes > 0
    layer.free_memory()
    assert layer.noise_memory_bytes == 0
    g2 = layer.es_grad(w)
    # exact: same route (the same fixed chunks; regenerated noise equals the stored noise)
    assert torch.equal(g1[0], g2[0])
    if g1[1] is not None:
        assert torch.equal(g1[1], g2[1])  # exact: same route, as above


def test_sharded_members_forward_and_update(case, make_x):
    _, factory = case
    full = factory()
    full.set_noise(0.1)
    x = make_x(full, 2)
    y_full = _forward(full, x)
    w = torch.randn(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g_full = full.es_grad(w)
    shard = factory()
    shard.load_state_dict(full.state_dict())
    shard.set_members([4, 1])
    shard.set_noise(0.1)
    x_shard = x.view(2, N, *x.shape[1:])[:, [4, 1]].reshape(4, *x.shape[1:])
    y_shard = _forward(shard, x_shard)
    torch.testing.assert_close(y_shard, y_full.view(2, N, *y_full.shape[1:])[:, [4, 1]].reshape_as(y_shard))
    g_shard = shard.es_grad(w)
    # exact: same route; bit-identical: the update regenerates the same noise
    assert torch.equal(g_shard[0], g_full[0])  # bit-identical: the update regenerates the same noise
    if g_full[1] is not None:
        assert torch.equal(g_shard[1], g_full[1])  # exact: same route, as above


def test_noise_reproducible_and_advances(case):
    _, factory = case
    a, b = factory(), factory()
    b.load_state_dict(a.state_dict())
    a.set_noise()
    b.set_noise()
    assert a.step == 0
    assert torch.equal(a.dense_noise()[0], b.dense_noise()[0])  # exact: same route (determinism of one call)
    first = a.dense_noise()[0]
    a.set_noise()
    assert a.step == 1
    assert not torch.equal(first, a.dense_noise()[0])  # exact: any change counts
    a.set_noise(step=0)  # replay
    assert torch.equal(first, a.dense_noise()[0])  # exact: same route (replayed step)
    b.set_layer_index(1)
    b.set_noise(step=0)
    assert not torch.equal(first, b.dense_noise()[0])  # exact: any change counts
    b.set_layer_index(0)
    b.set_seed(12345)
    b.set_noise(step=0)
    assert not torch.equal(first, b.dense_noise()[0])  # exact: any change counts


def test_dense_noise_subset_rows(case):
    _, factory = case
    layer = factory()
    layer.set_noise()
    full_w, full_b = layer.dense_noise()
    part_w, part_b = layer.dense_noise([5, 0])
    # exact: by construction: a member's noise depends on that member only
    assert torch.equal(part_w, full_w[[5, 0]])
    if full_b is not None:
        assert torch.equal(part_b, full_b[[5, 0]])  # exact: by construction, as above


def test_global_rng_untouched(case, make_x):
    _, factory = case
    layer = factory()
    x = make_x(layer, 2)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    layer.set_noise()
    _forward(layer, x)
    layer.update(torch.ones(N, dtype=torch.float64))
    layer.free_memory()
    layer.set_grad(torch.ones(N, dtype=torch.float64))
    assert torch.equal(torch.get_rng_state(), state)  # exact: byte tensors


def test_unperturbed_by_default(case, make_x):
    _, factory = case
    layer = factory()
    layer.set_noise()
    x = make_x(layer, 1)
    with torch.no_grad():
        if isinstance(layer, es.PerturbedAffine):
            # addcmul may fuse x·w + b into one FMA where the reference rounds x·w first:
            # |diff| <= (eps/2)·|x·w|, so eps·max|x·w| bounds it.
            xw = x * layer.weight
            bound = torch.finfo(xw.dtype).eps * float(xw.abs().max())
            torch.testing.assert_close(layer(x), xw + layer.bias, rtol=0, atol=bound)
            return
        base = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
        # exact: same route (unperturbed: the base class's forward)
        assert torch.equal(layer(x), base.forward(layer, x))


def test_state_dict_clean_and_save_roundtrip(case):
    _, factory = case
    layer = factory()
    layer.set_noise()
    keys = set(layer.state_dict())
    assert keys <= {"weight", "bias"}
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert torch.equal(state["weight"], layer.weight)  # exact: restored state


def test_to_moves_noise_dtype(case):
    _, factory = case
    layer = factory()
    layer.set_noise()
    layer.to(torch.float32)
    assert all(t.dtype in (torch.float32, torch.int64) for t in layer._noise.values())
    assert layer.dense_noise()[0].dtype == torch.float32


def test_float32_and_bfloat16_run(case, make_x, reference):
    _, factory = case
    layer = factory().to(torch.float32)
    layer.set_noise(0.1)
    x = make_x(layer, 2).float()
    torch.testing.assert_close(_forward(layer, x), reference(layer, x), rtol=1e-4, atol=1e-4)
    layer = factory().to(torch.bfloat16)
    layer.set_noise(0.1)
    y = _forward(layer, x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()


def test_extra_repr_mentions_population(case):
    _, factory = case
    text = repr(factory())
    assert "directions=6" in text
    assert "mode=" in text


# ----------------------------------------------------------------------------- structure of E_k


def _noise_of(layer, sigma=0.5):
    layer.set_noise(sigma)
    return layer.dense_noise()[0]


def test_entry_variance_is_sigma_squared():
    # Each entry of E_k has variance sigma^2 in every mode (sparse/permuted-sparse: the expected squared norm).
    sigma = 0.5
    layers = [
        es.PerturbedLinear(40, 30, 400, seed=0),
        es.SparsePerturbedLinear(40, 30, 400, sparsity=4, seed=0),
        es.PermutedLinear(400, 300, 20, in_sparsity=0.25, seed=0),  # shared E: 30,000 entries
        es.FlipoutLinear(200, 150, 20, flip="both", seed=0),
        es.LowRankLinear(40, 30, 400, rank=4, seed=0),
        es.LowRankConv2d(3, 8, 3, 400, seed=0),
    ]
    for layer in layers:
        e = _noise_of(layer, sigma).double()
        mean_sq = e.pow(2).mean().item()
        assert abs(mean_sq / sigma**2 - 1) < 0.1, (type(layer).__name__, mean_sq)
        assert abs(e.mean().item()) < 0.02


def test_sparse_structure():
    layer = es.SparsePerturbedLinear(10, 4, 20, sparsity=3, seed=0)
    e = _noise_of(layer)
    nonzero_cols = (e != 0).any(dim=1).sum(dim=1)
    assert (nonzero_cols == 3).all()
    assert (e != 0).sum(dim=(1, 2)).eq(12).all()
    assert es.SparsePerturbedLinear(10, 4, 3).sparsity == 3  # 'auto' = in // directions
    assert es.SparsePerturbedLinear(10, 4, 64).sparsity == 1


def test_permuted_structure():
    layer = es.PermutedLinear(8, 5, 10, permutation="in", seed=0, bias=False)
    e = _noise_of(layer)
    shared = layer._noise["shared_weight"]
    for k in range(10):
        perm = layer._noise["in_idx"][k]
        assert sorted(perm.tolist()) == list(range(8))
        assert torch.equal(e[k][:, perm], shared)  # exact: a permutation copies values
    layer = es.PermutedLinear(8, 6, 10, out_sparsity=2, in_sparsity=4, seed=0)
    e = _noise_of(layer)
    assert ((e != 0).any(dim=2).sum(dim=1) == 2).all()  # 2 output rows per member
    assert ((e != 0).any(dim=1).sum(dim=1) == 4).all()  # 4 input columns per member
    assert layer.permutation == "both"


def test_permuted_auto_rule():
    assert es.PermutedLinear(10, 20, 4).permutation == "both"
    assert es.PermutedLinear(64, 32, 4).permutation == "in"
    assert es.PermutedLinear(32, 64, 4).permutation == "out"
    assert es.PermutedLinear(64, 32, 4, out_sparsity=0.5).permutation == "out"
    assert es.PermutedLinear(64, 32, 4, permutation="in", out_sparsity=0.5).permutation == "both"


def test_flipout_structure():
    layer = es.FlipoutLinear(6, 5, 8, flip="both", seed=0)
    e = _noise_of(layer)
    shared = layer._noise["shared_weight"]
    ratio = e / shared
    assert set(ratio.unique().tolist()) == {-1.0, 1.0}  # exact: ±x / x is exactly ±1
    for k in range(8):
        r, s = layer._noise["out_sign"][k], layer._noise["in_sign"][k]
        assert torch.equal(ratio[k], torch.outer(r, s))  # exact: products of ±1 are exact
    assert es.FlipoutLinear(64, 32, 4).flip == "in"
    assert es.FlipoutLinear(8, 8, 4).flip == "both"


def test_flipout_both_update_is_linear_in_weights():
    # NESgpu's two-sided update was proportional to w^2; ours is linear.
    layer = es.FlipoutLinear(6, 5, 8, flip="both", seed=0, dtype=torch.float64)
    layer.set_noise()
    w = torch.randn(8, dtype=torch.float64)
    g1, _ = layer.es_grad(w)
    g2, _ = layer.es_grad(3 * w)
    torch.testing.assert_close(g2, 3 * g1)
    g3, _ = layer.es_grad(-w)
    torch.testing.assert_close(g3, -g1)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_lowrank_structure(rank):
    layer = es.LowRankLinear(9, 7, 5, rank=rank, seed=0, dtype=torch.float64)
    e = _noise_of(layer)
    for k in range(5):
        assert torch.linalg.matrix_rank(e[k]).item() == rank  # exact: integer-valued
    conv = es.LowRankConv2d(3, 6, 3, 4, rank=rank, seed=0, dtype=torch.float64)
    e = _noise_of(conv)
    for k in range(4):
        assert torch.linalg.matrix_rank(e[k].reshape(6, -1)).item() == rank  # exact: integer-valued


def test_lowrank_update_has_full_rank():
    layer = es.LowRankLinear(6, 5, 32, rank=1, seed=0, dtype=torch.float64)
    layer.set_noise()
    g, _ = layer.es_grad(torch.randn(32, dtype=torch.float64))
    assert torch.linalg.matrix_rank(g).item() == 5  # exact: integer-valued


def test_members_independent():
    layer = es.PerturbedLinear(30, 30, 50, seed=0, dtype=torch.float64)
    e = _noise_of(layer).reshape(50, -1)
    corr = torch.corrcoef(e)
    off = corr[~torch.eye(50, dtype=torch.bool)]
    assert off.abs().max() < 5 / math.sqrt(900)


def test_layers_of_one_model_have_independent_noise():
    net = nn.Sequential(es.PerturbedLinear(20, 20, 10), es.PerturbedLinear(20, 20, 10))
    pm = es.PerturbedModel(net, 10, seed=7)
    pm.set_noise()
    a, b = net[0].dense_noise()[0], net[1].dense_noise()[0]
    assert not torch.equal(a, b)  # exact: any change counts
    c = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert abs(c.item()) < 5 / math.sqrt(4000)


def test_chunked_update_matches_single_chunk(monkeypatch):
    import altgrad.es_layers.base as base

    layer = es.PerturbedLinear(8, 8, 40, seed=0, dtype=torch.float64)
    layer.set_noise()
    w = torch.randn(40, dtype=torch.float64)
    g1, _ = layer.es_grad(w)
    monkeypatch.setattr(base, "_CHUNK_ELEMENTS", 64 * 7)  # 7 members per chunk
    assert len(list(layer._chunks())) == 6
    layer.free_memory()
    g2, _ = layer.es_grad(w)
    torch.testing.assert_close(g1, g2)


# ----------------------------------------------------------------------------- bad input


def test_batch_not_multiple_of_directions(case, make_x):
    _, factory = case
    layer = factory()
    layer.set_noise()
    x = make_x(layer, 2)[:-1]
    with pytest.raises(ValueError, match="multiple of the number of directions"):
        _forward(layer, x)


def test_odd_repeats_with_antithetic(case, make_x):
    _, factory = case
    layer = factory()
    layer.set_noise()
    with pytest.raises(ValueError, match="even number of repeats"):
        _forward(layer, make_x(layer, 3))


def test_weights_of_wrong_length(case):
    _, factory = case
    layer = factory()
    layer.set_noise()
    with pytest.raises(ValueError, match=r"weights must have shape \(6,\)"):
        layer.update(torch.ones(5))
    with pytest.raises(ValueError, match="weights"):
        layer.set_grad(torch.ones(2, 3))
    with pytest.raises(TypeError, match="weights"):
        layer.update(torch.ones(6, dtype=torch.complex64))


def test_update_before_set_noise(case, make_x):
    _, factory = case
    layer = factory()
    with pytest.raises(RuntimeError, match="set_noise"):
        layer.update(torch.ones(N))
    with pytest.raises(RuntimeError, match="set_noise"):
        _forward(layer, make_x(layer, 1))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: es.PerturbedConv2d(4, 6, 3, N, dtype=torch.float64),
        lambda: es.PermutedConv2d(4, 6, 3, N, dtype=torch.float64),
        lambda: es.FlipoutConv2d(4, 6, 3, N, dtype=torch.float64),
        lambda: es.LowRankConv2d(4, 6, 3, N, dtype=torch.float64),
    ],
)
def test_conv_input_of_wrong_rank(factory):
    layer = factory()
    layer.set_noise()
    with pytest.raises(ValueError, match="4-D input"):
        _forward(layer, torch.randn(N, 4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="4-D input"):
        _forward(layer, torch.randn(N, 3, 7, 7, dtype=torch.float64))


def test_linear_input_of_wrong_width():
    layer = es.LowRankLinear(5, 3, 4)
    layer.set_noise()
    with pytest.raises((ValueError, RuntimeError)):
        _forward(layer, torch.randn(4, 6))


@pytest.mark.parametrize(
    ("factory", "exc", "match"),
    [
        (lambda: es.PerturbedLinear(3, 3, 0), ValueError, "directions"),
        (lambda: es.PerturbedLinear(3, 3, 2.0), TypeError, "directions"),
        (lambda: es.PerturbedLinear(3, 3, 2, noise_scale=-1.0), ValueError, "noise_scale"),
        (lambda: es.PerturbedLinear(3, 3, 2, antithetic="yes"), TypeError, "antithetic"),
        (lambda: es.PerturbedLinear(3, 3, 2, seed=1.5), TypeError, "seed"),
        (lambda: es.LowRankLinear(3, 3, 2, rank=0), ValueError, "rank"),
        (lambda: es.PermutedLinear(3, 3, 2, permutation="rows"), ValueError, "permutation"),
        (lambda: es.PermutedLinear(3, 3, 2, in_sparsity=5), ValueError, "in_sparsity"),
        (lambda: es.PermutedLinear(3, 3, 2, out_sparsity=1.5), ValueError, "out_sparsity"),
        (lambda: es.FlipoutLinear(3, 3, 2, flip="x"), ValueError, "flip"),
        (lambda: es.SparsePerturbedLinear(3, 3, 2, sparsity=4), ValueError, "sparsity"),
        (lambda: es.SparsePerturbedLinear(3, 3, 2, sparsity="all"), TypeError, "sparsity"),
        (lambda: es.PermutedConv2d(4, 4, 3, 2, groups=2), ValueError, "groups"),
        (lambda: es.LowRankConv2d(4, 4, 3, 2, groups=2), ValueError, "groups"),
    ],
)
def test_bad_constructor_arguments(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


def test_bad_members_and_scale():
    layer = es.PerturbedLinear(3, 3, 4)
    with pytest.raises(ValueError, match="members"):
        layer.set_members([4])
    with pytest.raises(ValueError, match="members"):
        layer.set_members([])
    with pytest.raises(ValueError, match="noise_scale"):
        layer.set_noise_scale(0.0)
    with pytest.raises(ValueError, match="step"):
        layer.set_noise(step=-1)
    with pytest.raises(ValueError, match="layer_index"):
        layer.set_layer_index(-1)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: es.PermutedLinear(5, 7, N, permutation="in", in_sparsity=3, dtype=torch.float64, seed=0),
        lambda: es.PermutedLinear(5, 4, N, permutation="out", out_sparsity=2, dtype=torch.float64, seed=0),
        lambda: es.PermutedConv2d(3, 4, 3, N, permutation="in", dtype=torch.float64, seed=0),
        lambda: es.PermutedConv2d(3, 4, 3, N, permutation="out", out_sparsity=2, dtype=torch.float64, seed=0),
    ],
)
def test_permuted_update_scatter_and_gemm_paths(factory, monkeypatch):
    # fewer members than permuted entries -> direct scatter (in sub-chunks); otherwise P = Σ w_k Π_k and a GEMM
    import altgrad.es_layers.functional.permuted as modes

    monkeypatch.setattr(modes, "_SCATTER_ELEMENTS", 1)  # one member per scatter sub-chunk
    monkeypatch.setattr(modes, "_SCATTER_PENALTY", 1)
    layer = factory()
    layer.set_noise()
    w = torch.randn(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dense = layer.dense_noise()[0]
    for members in ([2], [0, 3], list(range(N))):  # 1 and 2 members scatter, N = 6 members use the GEMM
        noise = {k: (v if k.startswith("shared") else v[members]) for k, v in layer._noise.items()}
        got = layer._weighted_sum(w[members], noise)
        torch.testing.assert_close(got, torch.einsum("k,k...->...", w[members], dense[members]))


# ----------------------------------------------------------------------------- bounded update memory (issue 12 #9)
def test_update_after_free_memory_regenerates_in_bounded_chunks(case, monkeypatch):
    # Allocator-independent measure: record the size of every noise tensor the samplers materialise.
    import altgrad.es_layers.base as base
    import altgrad.es_layers.noise as noise

    sizes = []
    for fn in ("sample_normal", "sample_rademacher", "sample_bits"):
        original = getattr(noise, fn)

        def record(*args, _f=original, **kwargs):
            out = _f(*args, **kwargs)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(noise, fn, record)
    _, factory = case
    layer = factory()
    per_member = layer._per_member_elements()
    monkeypatch.setattr(base, "_CHUNK_ELEMENTS", 2 * per_member)  # two members per chunk, N = 6 -> 3 chunks
    layer.set_noise()
    w = torch.linspace(-1, 1, N, dtype=torch.float64)
    g_stored = layer.es_grad(w)
    layer.free_memory()
    sizes.clear()
    layer.set_grad(w)
    assert layer.noise_memory_bytes == 0  # nothing stored by the update
    # a chunk holds 2 members' pieces; the shared matrix of permuted/flipout modes is member-independent
    assert sizes
    assert max(sizes) <= 2 * layer.weight.numel(), (sizes, per_member)
    # exact: same route (the same fixed chunks as with the stored noise)
    assert torch.equal(layer.weight.grad, g_stored[0])  # same values as with the stored noise


def test_iid_update_memory_does_not_grow_with_population(monkeypatch):
    import altgrad.es_layers.noise as noise

    largest = [0]
    original = noise.sample_normal

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        largest[0] = max(largest[0], out.numel())
        return out

    monkeypatch.setattr(noise, "sample_normal", record)
    import altgrad.es_layers.base as base

    # the case was 512 x 512, N = 512 (+513 MiB); a 64 x 64 layer with 8-member chunks shows the same
    monkeypatch.setattr(base, "_CHUNK_ELEMENTS", 8 * 64 * 64)
    layer = es.PerturbedLinear(64, 64, 512, bias=False, seed=0)
    layer.set_noise()
    layer.free_memory()
    largest[0] = 0
    layer.set_grad(torch.randn(512))
    assert largest[0] == 8 * 64 * 64  # one chunk at a time, not the population's 512 x 64 x 64
    assert layer.noise_memory_bytes == 0
