"""AIFS -- attention-invariant flexible switching: visual tokens first, same attention.

At prefill the language model's input is permuted so that every visual token (from any number of
images, wherever they sit in the prompt) comes first, text tokens after, each group in its original
order. Position ids travel with their tokens (RoPE / M-RoPE see the original positions) and the
causal mask is permuted: new position i may attend new position j iff orig(j) <= orig(i) and j is
not padding. The hidden states are put back in the original order before the head, so the model
computes exactly what it computed before -- but every modality is now one contiguous slice.

The KV cache holds the prefill in permuted order; later steps only need the padding mask of the
cached part permuted the same way (attention over cached keys is order-free).

Attention at prefill does not use the permuted mask when the batch has no padding: the permuted causal
mask is the plain causal mask of the original order, so :func:`attention` puts queries, keys and values
back in the original order (three gathers), runs SDPA with ``is_causal`` -- which skips the upper
triangle, where an explicit mask makes torch's kernels do the full square -- and permutes the output
again. Models in transformers reach it as the attention implementation ``"mquant"`` (set on the
language model's config by :func:`install`, or by :func:`use_project_attention` on any model), the project's own
decoders call :func:`attention` directly. The mask is still built and handed down, for batches with padding and
for any other caller. Every causal prefill without a mask (this one and the plain one) goes through
:func:`fake_quant.prefill_attention.causal`: SDPA, or the blocked bf16 CPU attention when that is switched on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import prefill_attention
from .modality import ModalityState

ATTN_IMPLEMENTATION = "mquant"


@dataclass
class _Order:
    """The permutation of the prefill the language model is running, while it runs."""

    perm: torch.Tensor  # [batch, seq]: new position -> original position
    inv: torch.Tensor   # [batch, seq]: original position -> new position


_current: _Order | None = None


def _reorder(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, :, idx[b, i]]`` for ``[batch, heads, seq, dim]``."""
    if idx.shape[0] == 1:
        return t.index_select(2, idx[0])
    return torch.gather(t, 2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def _applies(q: torch.Tensor, k: torch.Tensor) -> _Order | None:
    o = _current
    if o is None or q.dim() != 4 or k.dim() != 4:
        return None
    b, n = o.perm.shape
    if q.shape[0] != b or q.shape[2] != n or k.shape[2] != n or o.perm.device != q.device:
        return None
    return o


def _original_order(q, k, v, order: _Order, scale, enable_gqa: bool) -> torch.Tensor:
    q, k, v = (_reorder(t, order.inv) for t in (q, k, v))
    out = prefill_attention.causal(q, k, v, scale=scale, enable_gqa=enable_gqa)
    return _reorder(out, order.perm)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float | None = None, enable_gqa: bool = False, is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=...)`` (``[batch, heads, seq, dim]``), except
    during an AIFS prefill without padding, where ``attn_mask`` is the permuted causal mask and the same result is
    computed in the original order with ``is_causal`` (module docstring)."""
    order = _applies(q, k) if attn_mask is not None else None
    if order is not None:
        return _original_order(q, k, v, order, scale, enable_gqa)
    if is_causal and attn_mask is None:
        return prefill_attention.causal(q, k, v, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa,
                                          is_causal=is_causal and attn_mask is None)


def _hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                  **kwargs):
    """transformers' attention interface: ``sdpa_attention_forward``, with :func:`attention`'s prefill paths."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    order = _applies(query, key) if attention_mask is not None else None
    plain = (dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
             and not kwargs.get("output_attentions", False))
    gqa = query.shape[1] != key.shape[1]
    if order is not None and plain:
        out = _original_order(query, key, value, order, scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # where transformers' sdpa would run is_causal: the blocked prefill attention, when it is on and applies
    if (plain and causal and attention_mask is None and kwargs.get("sliding_window") is None
            and query.shape[2] > 1 and prefill_attention.applies(query, key)):
        out = prefill_attention.causal(query, key, value, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _register_hf() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers without the interfaces: the mask path still works
        return False
    AttentionInterface.register(ATTN_IMPLEMENTATION, _hf_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return True


def use_project_attention(language_model: nn.Module) -> None:
    """Point every transformers config under ``language_model`` that runs SDPA at :func:`_hf_attention` (SDPA with
    the project's prefill paths: AIFS's original order, :mod:`fake_quant.prefill_attention`)."""
    configs = {id(c): c for m in language_model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation", None) == "sdpa"}
    if configs and _register_hf():
        for c in configs.values():
            c._attn_implementation = ATTN_IMPLEMENTATION


def permutation(visual: torch.Tensor) -> torch.Tensor:
    """``perm[b, new] = original position``: visual positions first, then text, both stable."""
    key = (~visual).to(torch.int8)
    return torch.sort(key, dim=1, stable=True).indices


def permuted_causal_mask(perm: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[batch, 1, q, k]``: new i attends new j iff orig(j) <= orig(i) and j is not padding.
    Every position also attends itself, so padding rows stay finite."""
    allowed = perm[:, None, :] <= perm[:, :, None]  # the diagonal is True already
    if pad is not None:
        allowed &= ~torch.gather(pad, 1, perm)[:, None, :]
        allowed |= torch.eye(perm.shape[1], dtype=torch.bool, device=perm.device)
    return allowed[:, None]


def _gather_seq(t: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder ``t`` along its sequence dimension ``dim`` (batch is the dimension before it)."""
    if perm.shape[0] == 1 and t.shape[dim - 1] == 1:  # one sequence: a plain row selection (9x faster than gather)
        return t.index_select(dim, perm[0])
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
    use_project_attention(language_model)

    def before(module, args, kwargs):
        global _current
        _current = None
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
            if pad is None or not bool(pad.any()):
                _current = _Order(perm, torch.argsort(perm, dim=1))
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
        global _current
        _current = None
        if not state.prefill or state.perm is None:
            return None
        perm = state.perm
        output.last_hidden_state = _scatter_back(output.last_hidden_state, perm)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(_scatter_back(h, perm) for h in output.hidden_states)
        return output

    language_model.register_forward_pre_hook(before, with_kwargs=True)
    language_model.register_forward_hook(after, with_kwargs=True)
