"""Fine-tune a Hugging Face causal LM with LoRA from forward passes only, at inference memory.

A GPT-2 is built from a small ``transformers`` config (random init, nothing downloaded) and "pretrained" with
backprop + Adam for a few seconds on sequences that count up by one (``3 4 5 6 ...`` modulo 16). The fine-tuning
task is to count up by two (``3 5 7 9 ...``). A ``peft`` LoRA (rank 4 on ``c_attn``, ``c_proj`` and ``c_fc``) is the
only trainable part, and :class:`altgrad.zero_order.ZOSGD` (MeZO's ZO-SGD, ``memory="inference"`` under the hood)
trains it: each step evaluates the loss at ``θ ± σz`` with each layer's perturbed weights existing only during that
layer's forward, then steps the adapters in place. No ``.grad`` is allocated, the frozen base weights are never
written (checked bit for bit at the end), and the held-out loss on the new task falls.

Run ``python examples/zero_order_lora_lm.py`` (``--quick`` for the short version used by the tests).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, limit_threads, print_table, seed_everything

from altgrad.zero_order import ZOSGD

VOCAB = 16
#: The full run passes when the held-out loss on the new task falls below this fraction of its start.
TARGET_RATIO = 0.5
TARGET_RATIO_QUICK = 0.7


def counting(stride: int, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences ``s, s + stride, s + 2·stride, ...`` modulo `VOCAB` from random starts, shape ``(batch, length)``."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (start + stride * torch.arange(length)) % VOCAB


def build_model(pretrain_steps: int, generator: torch.Generator):
    """A 2-layer GPT-2 (d=64) from a config, pretrained with backprop on stride-1 counting, wrapped in a LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = GPT2LMHeadModel(config)
    adam = torch.optim.Adam(base.parameters(), lr=3e-3)
    for _ in range(pretrain_steps):
        ids = counting(1, 16, 16, generator)
        loss = base(input_ids=ids, labels=ids).loss
        adam.zero_grad()
        loss.backward()
        adam.step()
    base.zero_grad(set_to_none=True)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, lora)
    model.eval()  # no dropout: every member sees the same deterministic function
    return model


def main(quick: bool = False, seed: int = 0) -> dict:
    """Pretrain, then fine-tune the LoRA adapters with ZO-SGD; return the losses and the checks.

    Args:
        quick: the short version for the integration tests (fewer steps, lower target).
        seed: seed of the model initialisation and the data.

    Returns:
        ``{"name", "passed", "target", "summary", "initial_loss", "final_loss", "trainable", "frozen_unchanged",
        "losses", "seconds"}``. ``passed`` is true when the held-out loss falls below ``TARGET_RATIO`` (0.7 quick)
        of its start and the frozen weights are bit-identical to before.
    """
    with limit_threads():
        generator = seed_everything(seed)
        steps = 100 if quick else 300
        with Timer() as timer:
            model = build_model(pretrain_steps=150, generator=generator)
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
            frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
            held_out = counting(2, 64, 16, generator)
            opt = ZOSGD(model, lr=5e-2, sigma=1e-2, num_samples=2)

            def evaluate() -> float:
                with torch.no_grad():
                    return float(model(input_ids=held_out, labels=held_out).loss)

            losses = [(0, evaluate())]
            for step in range(1, steps + 1):
                ids = counting(2, 16, 16, generator)
                opt.step(lambda ids=ids: model(input_ids=ids, labels=ids).loss)
                if step % 25 == 0:
                    losses.append((step, evaluate()))
                    print(f"step {step:4d}  held-out loss {losses[-1][1]:.3f}", flush=True)
        # exact: frozen weights are never written (no perturbation residue, no update)
        unchanged = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        no_grad = all(p.grad is None for p in model.parameters())
    ratio = TARGET_RATIO_QUICK if quick else TARGET_RATIO
    initial, final = losses[0][1], losses[-1][1]
    passed = final < ratio * initial and unchanged and no_grad
    print_table(
        "ZO-SGD LoRA fine-tuning of a GPT-2 (counting by 2 after pretraining on counting by 1)",
        ["step", "held-out loss"],
        [[s, f"{v:.3f}"] for s, v in losses],
    )
    summary = (
        f"held-out loss {initial:.3f} -> {final:.3f} in {steps} ZO-SGD steps ({len(trainable)} LoRA tensors "
        f"trained; frozen weights bit-identical: {unchanged}; .grad allocated: {not no_grad})"
    )
    print(summary)
    return {
        "name": "zero_order_lora_lm",
        "passed": passed,
        "target": f"held-out loss < {ratio} x start, frozen weights untouched",
        "summary": summary,
        "initial_loss": initial,
        "final_loss": final,
        "losses": losses,
        "trainable": trainable,
        "frozen_unchanged": unchanged,
        "no_grad": no_grad,
        "seconds": timer.seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short version used by the tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.exit(0 if main(quick=args.quick, seed=args.seed)["passed"] else 1)
