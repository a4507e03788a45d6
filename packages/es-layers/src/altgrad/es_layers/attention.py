"""Population forward of ``nn.MultiheadAttention`` (so of ``nn.TransformerEncoderLayer``/``DecoderLayer``).

The packed input projection ``in_proj_weight`` (``3E × E``) and ``out_proj`` are perturbed linears of their unit's
mode (low rank: ``x Wᵀ + σ (x b_k) a_kᵀ``); the attention itself runs once on the ``(R·n·batch)`` rows with
``F.scaled_dot_product_attention`` (or an explicit softmax when the weights are asked for).

**Population dimension.** The batch dimension: dim 0 with ``batch_first=True``, dim 1 of ``(L, B, E)`` inputs
otherwise (torch's default). ``B = repeat_size * n`` with the member index fastest; ``key_padding_mask`` is
``(B, S)`` and a 3-D ``attn_mask`` is ``(B * num_heads, L, S)``, as for the module itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .units import UnitHost, unit_linear

__all__ = ["PerturbedMultiheadAttention", "supports_attention"]


def supports_attention(module: nn.MultiheadAttention) -> bool:
    """True when the batched path covers this configuration (packed projections, no ``bias_k``/``bias_v``, no
    ``add_zero_attn``); other configurations take the generic path."""
    return bool(module._qkv_same_embed_dim) and module.bias_k is None and not module.add_zero_attn


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class PerturbedMultiheadAttention(UnitHost, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose population perturbs ``in_proj_weight``/``in_proj_bias`` and ``out_proj``."""

    es_kind = "attention"

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention as ``nn.MultiheadAttention.forward``, or the population's when ``perturbed_flag`` is set.

        Args:
            query: ``(L, B, E)`` (``(B, L, E)`` with ``batch_first``); ``B = repeat_size * n``, member fastest.
            key: ``(S, B, E)`` or ``(B, S, E)``.
            value: Same layout as ``key``.
            key_padding_mask: ``(B, S)`` bool (True = ignore) or float, or ``None``.
            need_weights: Also return the attention weights.
            attn_mask: ``(L, S)`` or ``(B * num_heads, L, S)``, bool or float, or ``None``.
            average_attn_weights: Average the returned weights over the heads.
            is_causal: Causal attention when ``attn_mask`` is ``None`` (a hint otherwise, as in torch).

        Returns:
            ``(output, weights)`` with ``output`` in the layout of ``query``; ``weights`` ``(B, L, S)`` (or
            ``(B, num_heads, L, S)``) or ``None``.
        """
        if not self.perturbed_flag:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: the population needs batched 3-D query/key/value, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        same_kv = key is value
        same_qkv = same_kv and query is key
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        e, h = self.embed_dim, self.num_heads
        inp = self._unit("in_proj_weight")
        if same_qkv:
            q, k, v = unit_linear(inp, query).chunk(3, dim=-1)
        else:  # the packed projection on each distinct input (2-3x the work of self-attention)
            q = unit_linear(inp, query)[..., :e]
            if same_kv:
                k, v = unit_linear(inp, key)[..., e:].chunk(2, dim=-1)
            else:
                k = unit_linear(inp, key)[..., e : 2 * e]
                v = unit_linear(inp, value)[..., 2 * e :]
        b, lq, s = query.shape[0], query.shape[1], key.shape[1]
        hd = e // h
        qh = q.reshape(b, lq, h, hd).transpose(1, 2)
        kh = k.reshape(b, s, h, hd).transpose(1, 2)
        vh = v.reshape(b, s, h, hd).transpose(1, 2)
        mask = self._population_mask(attn_mask, key_padding_mask, b, lq, s, qh.dtype, is_causal)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = qh @ kh.transpose(-2, -1) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            attn = torch.softmax(scores, dim=-1)
            if dropout > 0:
                attn = F.dropout(attn, dropout)
            o = attn @ vh
            weights = attn.mean(dim=1) if average_attn_weights else attn
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout)
        out = unit_linear(self._unit("out_proj.weight"), o.transpose(1, 2).reshape(b, lq, e))
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _population_mask(self, attn_mask, key_padding_mask, b, lq, s, dtype, is_causal):
        """One additive ``(B or 1, heads or 1, L, S)`` mask from torch's mask arguments (``None`` if none)."""
        mask = _float_mask(attn_mask, dtype)
        if mask is None and is_causal:
            causal = torch.ones(lq, s, dtype=torch.bool, device=self.in_proj_weight.device).triu_(1)
            mask = _float_mask(causal, dtype)
        if mask is not None:
            if mask.dim() == 3:
                if mask.shape != (b * self.num_heads, lq, s):
                    raise ValueError(
                        f"attn_mask: expected (L, S) or ({b * self.num_heads}, {lq}, {s}), got {tuple(mask.shape)}"
                    )
                mask = mask.view(b, self.num_heads, lq, s)
            elif mask.shape != (lq, s):
                raise ValueError(f"attn_mask: expected ({lq}, {s}), got {tuple(mask.shape)}")
        pad = _float_mask(key_padding_mask, dtype)
        if pad is not None:
            if pad.shape != (b, s):
                raise ValueError(f"key_padding_mask: expected ({b}, {s}), got {tuple(pad.shape)}")
            pad = pad.view(b, 1, 1, s)
            mask = pad if mask is None else mask + pad
        return mask
