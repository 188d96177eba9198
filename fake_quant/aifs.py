"""AIFS -- attention-invariant flexible switching: visual tokens first, same attention.

At prefill the language model's input is permuted so that every visual token (from any number of
images, wherever they sit in the prompt) comes first, text tokens after, each group in its original
order. Position ids travel with their tokens (RoPE / M-RoPE see the original positions) and the
causal mask is permuted: new position i may attend new position j iff orig(j) <= orig(i) and j is
not padding. The hidden states are put back in the original order before the head, so the model
computes exactly what it computed before -- but every modality is now one contiguous slice.

The KV cache holds the prefill in permuted order; later steps only need the padding mask of the
cached part permuted the same way (attention over cached keys is order-free).
"""
from __future__ import annotations

import torch
from torch import nn

from .modality import ModalityState


def permutation(visual: torch.Tensor) -> torch.Tensor:
    """``perm[b, new] = original position``: visual positions first, then text, both stable."""
    key = (~visual).to(torch.int8)
    return torch.sort(key, dim=1, stable=True).indices


def permuted_causal_mask(perm: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[batch, 1, q, k]``: new i attends new j iff orig(j) <= orig(i) and j is not padding.
    Every position also attends itself, so padding rows stay finite."""
    allowed = perm[:, None, :] <= perm[:, :, None]
    if pad is not None:
        allowed &= ~torch.gather(pad, 1, perm)[:, None, :]
    eye = torch.eye(perm.shape[1], dtype=torch.bool, device=perm.device)
    return (allowed | eye)[:, None]


def _gather_seq(t: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder ``t`` along its sequence dimension ``dim`` (batch is the dimension before it)."""
    shape = [1] * t.dim()
    shape[dim - 1], shape[dim] = perm.shape
    idx = perm.reshape(shape).expand(*t.shape[:dim], perm.shape[1], *t.shape[dim + 1:])
    return torch.gather(t, dim, idx)


def _scatter_back(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_gather_seq(t, perm, 1)`` for ``[batch, seq, ...]``."""
    inv = torch.argsort(perm, dim=1)
    return _gather_seq(t, inv, 1)


def install(language_model: nn.Module, state: ModalityState) -> None:
    """Hooks on the language model (a decoder taking ``inputs_embeds``, ``position_ids``,
    ``attention_mask`` and returning ``last_hidden_state``)."""

    def before(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None and mask2d.dim() != 2:
            return None  # a custom mask already: leave it alone
        if state.prefill:
            if emb is None or state.mask is None or state.mask.shape != emb.shape[:2] or not state.mask.any():
                return None
            perm = permutation(state.mask)
            pad = None if mask2d is None else (mask2d == 0)
            state.perm, state.pad = perm, pad
            kwargs["inputs_embeds"] = _gather_seq(emb, perm, 1)
            pos = kwargs.get("position_ids")
            if pos is None:  # the decoder would number the permuted tokens 0..S-1: give it the original ones
                pos = torch.arange(emb.shape[1], device=emb.device).expand(emb.shape[0], -1)
            kwargs["position_ids"] = _gather_seq(pos, perm, pos.dim() - 1)
            kwargs["attention_mask"] = permuted_causal_mask(perm, pad)
            state.set_index(torch.gather(state.groups, 1, perm))
            return args, kwargs
        if state.perm is not None and mask2d is not None:  # decode: cached keys are in permuted order
            n = state.perm.shape[1]
            # beam search decodes several beams of one prefilled prompt: they share its permutation
            perm = state.perm.expand(mask2d.shape[0], -1) if state.perm.shape[0] == 1 else state.perm
            head = torch.gather(mask2d[:, :n], 1, perm)
            kwargs["attention_mask"] = torch.cat([head, mask2d[:, n:]], dim=1)
            return args, kwargs
        return None

    def after(module, args, kwargs, output):
        if not state.prefill or state.perm is None:
            return None
        perm = state.perm
        output.last_hidden_state = _scatter_back(output.last_hidden_state, perm)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(_scatter_back(h, perm) for h in output.hidden_states)
        return output

    language_model.register_forward_pre_hook(before, with_kwargs=True)
    language_model.register_forward_hook(after, with_kwargs=True)
