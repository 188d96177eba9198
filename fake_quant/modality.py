"""Which rows are visual tokens, known once per forward: the basis of MSQ and AIFS.

A forward pre-hook on the whole model reads the batch's ``input_ids`` once, asks the adapter which
positions are visual tokens, and stores the mask in a :class:`ModalityState`. Modality-specific
quantization reads it through the shared :class:`~fake_quant.quant_utils.RowGroupContext`
(1 = visual row, 0 = text row); token reordering (AIFS) reads it at the language model's input.

With ``sink=True`` the first (non-padding) token of every sequence at prefill gets a row group of its
own, the last one: decoder LLMs turn that token into an attention sink whose activations are orders
of magnitude larger than any other token's (SmolLM2's layer-11 ``down_proj`` input: 109 at
``<|im_start|>``, at most 2.3 elsewhere), so a static scale shared with it rounds every other token
of the group to a handful of levels.
"""
from __future__ import annotations

import torch
from torch import nn

from .quant_utils import RowGroupContext

TEXT, VISUAL = 0, 1


def row_groups(msq: bool, sink: bool) -> int:
    """How many static scale sets an LLM activation quantizer keeps."""
    return (2 if msq else 1) + (1 if sink else 0)


def group_index(mask: torch.Tensor, msq: bool = True, sink: bool = False,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Long ``[batch, seq]`` row groups: TEXT / VISUAL (VISUAL only with ``msq``) and, with ``sink``,
    the last group for the first non-padding token of each row."""
    index = mask.long() * VISUAL if msq else torch.zeros_like(mask, dtype=torch.long)
    if sink:
        valid = torch.ones_like(mask) if attention_mask is None else attention_mask.bool()
        first = valid.long().argmax(dim=1)  # the first valid position of each row
        rows = valid.any(dim=1).nonzero().flatten()  # rows with any valid token
        index[rows, first[rows]] = row_groups(msq, sink) - 1
    return index


class ModalityState:
    def __init__(self, context: RowGroupContext | None = None, msq: bool = True, sink: bool = False) -> None:
        self.context = context
        self.msq, self.sink = msq, sink
        self.mask: torch.Tensor | None = None   # bool [batch, seq] of the current forward, original order
        self.groups: torch.Tensor | None = None  # long [batch, seq]: each row's scale set, original order
        self.prefill = True
        self.perm: torch.Tensor | None = None   # AIFS: new position -> original position, from the last prefill
        self.pad: torch.Tensor | None = None    # AIFS: padding of the prefill (original order)

    def set_index(self, groups: torch.Tensor | None) -> None:
        if self.context is not None:
            self.context.set(None if groups is None else groups.reshape(-1))


def _cache_len(kwargs: dict) -> int:
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def install_tracking(loaded, adapter, state: ModalityState) -> None:
    """Pre-hook on the model: compute the visual-token mask of every forward, once."""
    if getattr(loaded, "modality_state", None) is not None:
        raise RuntimeError("modality tracking is already installed on this model")

    def hook(module: nn.Module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state.prefill = _cache_len(kwargs) == 0
        if state.prefill:
            state.perm = state.pad = None
        if ids is None:
            state.mask = state.groups = None
            state.set_index(None)  # embeddings given directly: every row uses the default (text) scales
            return
        state.mask = adapter.visual_token_mask(loaded, {**kwargs, "input_ids": ids}).bool()
        attn = kwargs.get("attention_mask")
        attn = attn if attn is not None and attn.dim() == 2 and attn.shape == state.mask.shape else None
        state.groups = group_index(state.mask, state.msq, state.sink and state.prefill, attn)
        state.set_index(state.groups)

    loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
    loaded.modality_state = state
