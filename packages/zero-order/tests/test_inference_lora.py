"""``memory="inference"`` on a Hugging Face GPT-2 (built from a config, random init) with a peft LoRA.

Only the adapters are perturbed and trained; the frozen weights stay bit-identical and get no ``.grad``. The
estimate is compared with a float64 member loop that writes θ ± σz_k into a copy of the model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import altgrad.zero_order as zo

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

F64 = torch.float64
VOCAB = 16


def _lora_gpt2(dtype: torch.dtype = torch.float32):
    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = transformers.GPT2LMHeadModel(config).to(dtype)
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, lora)
    model.eval()
    with torch.no_grad():  # peft starts lora_B at zero; make the adapters non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


def test_lora_estimate_matches_float64_reference_frozen_untouched():
    torch.manual_seed(0)
    model = _lora_gpt2(F64)
    ids = torch.randint(0, VOCAB, (2, 8))
    n, sigma = 2, 1e-3

    class Net(
        zo.ZeroOrderGradientModule, method="antithetic", num_samples=n, sigma=sigma, memory="inference"
    ):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, ids):
            return self.lm(input_ids=ids, labels=ids).loss

        def zero_order_distribution(self):
            return zo.SeededNormal(5)

        def sample(self, sample_shape=torch.Size()):  # noqa: B008
            return torch.randn(sample_shape)

    net = Net()
    ref = copy.deepcopy(model)
    frozen = {k: p.detach().clone() for k, p in net.named_parameters() if not p.requires_grad}
    trainable = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in k for k, _ in trainable)
    net(ids).backward()
    for k, p in net.named_parameters():
        if k in frozen:
            assert p.grad is None, k
            # exact: frozen weights are never perturbed nor written
            assert torch.equal(p, frozen[k]), k

    ref_params = [p for p in ref.parameters() if p.requires_grad]
    base = [p.detach().clone() for p in ref_params]
    z = [
        zo.SeededNormal(5).draw(p.shape, step=0, leaf=j, members=range(n), dtype=F64)
        for j, p in enumerate(ref_params)
    ]

    def f(k: int, c: float) -> float:
        with torch.no_grad():
            for p, b, zj in zip(ref_params, base, z):
                p.copy_(b + c * zj[k])
            return float(ref(input_ids=ids, labels=ids).loss)

    w = [(f(k, sigma) - f(k, -sigma)) / (2 * sigma * n) for k in range(n)]
    for (name, p), zj in zip(trainable, z):
        expected = sum(wk * zj[k] for k, wk in enumerate(w))
        # float64 losses (~2.8) exact to ~1e-14; θ ± σz built with one rounding on each side: weights differ by
        # < 1e-13 / (2σ) = 5e-11, times |z| < 6 over 2 members: < 1e-9
        torch.testing.assert_close(p.grad, expected, atol=1e-8, rtol=0, msg=name)


def test_zo_sgd_on_bf16_lora_only_adapters_move():
    torch.manual_seed(1)
    model = _lora_gpt2(torch.bfloat16)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    ids = torch.randint(0, VOCAB, (4, 8))
    opt = zo.ZOSGD(model, lr=1e-2, sigma=5e-2, num_samples=2)
    for _ in range(3):
        loss = opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        assert torch.isfinite(loss)
    for k, p in model.named_parameters():
        # the base is bfloat16; peft keeps its adapters in float32 (autocast_adapter_dtype)
        assert p.dtype == (torch.float32 if "lora_" in k else torch.bfloat16), k
        assert p.grad is None
        # exact: frozen weights are never written; adapters are written by the update only
        same = torch.equal(p, before[k])
        assert same != ("lora_" in k), k
