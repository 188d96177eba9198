"""Pieces of the perceiver-style resamplers of Qwen-VL and MiniCPM-V: learned queries cross-attending to the vision
tokens through an ``nn.MultiheadAttention`` in the original code, a fixed 2-D sin-cos position table, and a raw
``[in, out]`` output matrix ``proj``.

In our modules the attention's packed ``in_proj_weight`` / ``in_proj_bias`` ([Wq; Wk; Wv]) are three layers
``q_proj`` / ``k_proj`` / ``v_proj`` -- queries, keys and values come from different tensors, so one packed layer
could not be quantized or rotated -- and ``proj`` is a Linear with weight ``proj^T``. :func:`to_ours` and
:func:`to_original` map checkpoint tensors between the two layouts.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ResamplerAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch-first here) with its in-projection split into three layers."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_padding_mask``: bool ``[b, keys]``, True where a key is padding (as nn.MultiheadAttention)."""
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v)),
                                             attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1))


def sincos_2d(embed_dim: int, rows: int, cols: int | None = None) -> torch.Tensor:
    """The fixed 2-D sin-cos table ``[rows * cols, embed_dim]`` (MAE recipe, numpy float32) both resamplers use:
    the first half of the channels encodes the column, the second the row; positions are row-major."""
    cols = rows if cols is None else cols

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    c, r = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    table = np.concatenate([one_d(embed_dim // 2, c), one_d(embed_dim // 2, r)], axis=1)
    return torch.from_numpy(table.astype(np.float32))


def to_ours(key: str, t: torch.Tensor, attn: str, proj: str) -> list[tuple[str, torch.Tensor]]:
    """One original (key, tensor) as our (key, tensor) pairs: ``<attn>.in_proj_weight`` / ``_bias`` split into
    ``<attn>.{q,k,v}_proj``, ``<proj>`` transposed into ``<proj>.weight``; anything else unchanged."""
    if key in (f"{attn}.in_proj_weight", f"{attn}.in_proj_bias"):
        kind = "weight" if key.endswith("weight") else "bias"
        if t.shape[0] % 3:
            raise ValueError(f"tensor {key} has {t.shape[0]} rows, not three equal blocks [Wq; Wk; Wv]")
        return [(f"{attn}.{n}_proj.{kind}", c) for n, c in zip("qkv", t.chunk(3, dim=0))]
    if key == proj:
        if t.dim() != 2:
            raise ValueError(f"tensor {key} has shape {tuple(t.shape)}, expected an [in, out] matrix")
        return [(proj + ".weight", t.t())]
    return [(key, t)]


def original_keys(attn: str, proj: str) -> tuple[str, ...]:
    """The original names :func:`to_ours` renames."""
    return f"{attn}.in_proj_weight", f"{attn}.in_proj_bias", proj


def to_original(state: dict[str, torch.Tensor], attn: str, proj: str) -> dict[str, torch.Tensor]:
    """Our state dict -> the original checkpoint's tensors (for writing checkpoints in the original format)."""
    split = {f"{attn}.{n}_proj.{kind}" for n in "qkv" for kind in ("weight", "bias")}
    out = {}
    for k, v in state.items():
        if k in split:
            continue
        out[proj if k == proj + ".weight" else k] = v.t().contiguous() if k == proj + ".weight" else v
    for kind in ("weight", "bias"):
        out[f"{attn}.in_proj_{kind}"] = torch.cat([state[f"{attn}.{n}_proj.{kind}"] for n in "qkv"], dim=0)
    return out
