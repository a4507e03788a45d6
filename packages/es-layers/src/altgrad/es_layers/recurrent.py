"""Population forwards of ``nn.LSTM`` and ``nn.GRU``: a time loop of perturbed linears.

Per layer and direction the input projection ``x W_ihᵀ`` runs once over the whole sequence and the recurrent
``h W_hhᵀ`` once per step, each a perturbed linear of its unit's mode (low rank: ``h W_hhᵀ + σ (h b_k) a_kᵀ``),
so every weight matrix (input and recurrent) and every bias is perturbed.

**Population dimension.** The batch dimension: dim 0 of ``(B, T, in)`` inputs with ``batch_first=True``, dim 1 of
``(T, B, in)`` otherwise (torch's default), and dim 1 of ``h_0``/``c_0`` ``(layers * directions, B, H)``;
``B = repeat_size * n`` with the member index fastest. An LSTM with ``proj_size > 0`` projects each step's
hidden state with its (perturbed) ``weight_hr`` as torch does: ``h_0``/``h_n`` are ``(layers * directions, B,
proj_size)``, ``c_0``/``c_n`` keep ``hidden_size``. Packed sequences are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .units import UnitHost, unit_linear

__all__ = ["PerturbedGRU", "PerturbedLSTM"]


class _PerturbedRNN(UnitHost):
    """The shared time loop (``_cell`` is the LSTM or GRU update)."""

    num_layers: int
    bidirectional: bool
    batch_first: bool
    hidden_size: int
    dropout: float
    training: bool

    @staticmethod
    def _cell(gx: Tensor, gh: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _population(self, input: Tensor, h0: Tensor | None, c0: Tensor | None):
        if isinstance(input, PackedSequence):
            raise ValueError(
                f"{type(self).__name__}: a PackedSequence input is not supported for the population"
            )
        if input.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: the population needs a batched 3-D input, got {tuple(input.shape)}"
            )
        x = input if self.batch_first else input.transpose(0, 1)  # (B, T, in)
        b, t = x.shape[0], x.shape[1]
        d = 2 if self.bidirectional else 1
        proj = getattr(self, "proj_size", 0)  # an LSTM's h is projected to proj_size (0: not projected)
        h_zeros = x.new_zeros(self.num_layers * d, b, proj or self.hidden_size)
        c_zeros = x.new_zeros(self.num_layers * d, b, self.hidden_size)
        h0 = h_zeros if h0 is None else h0
        c0 = c_zeros if c0 is None else c0
        for name, s, zeros in (("h_0", h0, h_zeros), ("c_0", c0, c_zeros)):
            if s.shape != zeros.shape:
                raise ValueError(f"{name}: expected shape {tuple(zeros.shape)}, got {tuple(s.shape)}")
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for direction in range(d):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                gx = unit_linear(self._unit("weight_ih" + sfx), layer_input)  # (B, T, G*H)
                hh = self._unit("weight_hh" + sfx)
                hr = self._unit("weight_hr" + sfx) if proj else None
                h, c = h0[layer * d + direction], c0[layer * d + direction]
                ys: list[Tensor] = [x] * t
                for step in range(t - 1, -1, -1) if direction else range(t):
                    h, c = self._cell(gx[:, step], unit_linear(hh, h), h, c)
                    if hr is not None:
                        h = unit_linear(hr, h)
                    ys[step] = h
                outs.append(torch.stack(ys, dim=1) if t else gx.new_zeros(b, 0, h.shape[-1]))
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if d == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        out = layer_input if self.batch_first else layer_input.transpose(0, 1)
        return out, torch.stack(h_n), torch.stack(c_n)


class PerturbedLSTM(_PerturbedRNN, nn.LSTM):
    """``nn.LSTM`` whose population perturbs every ``weight_ih``/``weight_hh``/``weight_hr`` and bias of every layer."""

    es_kind = "lstm"

    def forward(  # type: ignore[override]
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """As ``nn.LSTM.forward``, or the population's when ``perturbed_flag`` is set.

        Args:
            input: ``(T, B, in)`` (``(B, T, in)`` with ``batch_first``), ``B = repeat_size * n``, member fastest.
            hx: ``(h_0, c_0)``: ``(num_layers * directions, B, proj_size or H)`` and ``(num_layers * directions,
                B, H)``, or ``None`` (zeros).

        Returns:
            ``(output, (h_n, c_n))`` as ``nn.LSTM``.
        """
        if not self.perturbed_flag:
            return super().forward(input, hx)
        h0, c0 = (None, None) if hx is None else hx
        out, h, c = self._population(input, h0, c0)
        return out, (h, c)

    @staticmethod
    def _cell(gx: Tensor, gh: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g, o = (gx + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class PerturbedGRU(_PerturbedRNN, nn.GRU):
    """``nn.GRU`` whose population perturbs every ``weight_ih``/``weight_hh`` and bias of every layer."""

    es_kind = "gru"

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """As ``nn.GRU.forward``, or the population's when ``perturbed_flag`` is set.

        Args:
            input: ``(T, B, in)`` (``(B, T, in)`` with ``batch_first``), ``B = repeat_size * n``, member fastest.
            hx: ``h_0`` ``(num_layers * directions, B, H)`` or ``None`` (zeros).

        Returns:
            ``(output, h_n)`` as ``nn.GRU``.
        """
        if not self.perturbed_flag:
            return super().forward(input, hx)
        out, h, _ = self._population(input, hx, None)
        return out, h

    @staticmethod
    def _cell(gx: Tensor, gh: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        rx, zx, nx = gx.chunk(3, dim=-1)
        rh, zh, nh = gh.chunk(3, dim=-1)
        r = torch.sigmoid(rx + rh)
        z = torch.sigmoid(zx + zh)
        n = torch.tanh(nx + r * nh)
        return (1 - z) * n + z * h, c
