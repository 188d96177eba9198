"""Which rows are visual tokens, known once per forward: the basis of MSQ and AIFS.

A forward pre-hook on the whole model reads the batch's ``input_ids`` once, asks the adapter which
positions are visual tokens, and stores the mask in a :class:`ModalityState`. Modality-specific
quantization reads it through the shared :class:`~fake_quant.quant_utils.RowGroupContext`
(1 = visual row, 0 = text row); token reordering (AIFS) reads it at the language model's input.
"""
from __future__ import annotations

import torch
from torch import nn

from .quant_utils import RowGroupContext

TEXT, VISUAL = 0, 1


class ModalityState:
    def __init__(self, context: RowGroupContext | None = None) -> None:
        self.context = context
        self.mask: torch.Tensor | None = None   # bool [batch, seq] of the current forward, original order
        self.prefill = True
        self.perm: torch.Tensor | None = None   # AIFS: new position -> original position, from the last prefill
        self.pad: torch.Tensor | None = None    # AIFS: padding of the prefill (original order)

    def set_index(self, mask: torch.Tensor | None) -> None:
        if self.context is not None:
            self.context.set(None if mask is None else mask.reshape(-1).long() * VISUAL)


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
            state.mask = None
            state.set_index(None)  # embeddings given directly: every row uses the default (text) scales
            return
        state.mask = adapter.visual_token_mask(loaded, {**kwargs, "input_ids": ids}).bool()
        state.set_index(state.mask)

    loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
    loaded.modality_state = state
