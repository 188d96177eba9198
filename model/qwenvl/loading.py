"""Load a Qwen-VL-Chat checkpoint folder (config.json + weight shards + ``qwen.tiktoken``) into our modules.

Tensors are read by their original names from safetensors shards, or from ``pytorch_model*.bin`` shards
(``torch.load(weights_only=True)``) when that is what the folder holds. Two original tensors change shape on
the way in (see :mod:`.vision`): the resampler's packed ``in_proj_weight`` / ``in_proj_bias`` are split into
q / k / v, and ``visual.proj`` ([in, out]) is transposed into a Linear weight. A missing or misshaped tensor
is an error that names it.
"""
from __future__ import annotations

import logging
import os

import torch

from .. import resampler
from ..base import read_config
from ..weights import build_empty, load_state
from .config import QWenConfig
from .modeling import QWenLMHeadModel
from .processor import QWenVLProcessor
from .tokenizer import QWenTokenizer

log = logging.getLogger("mquant")

POOL = "transformer.visual.attn_pool.attn"
PROJ = "transformer.visual.proj"
IGNORED = (".attn.masked_bias", ".attn.bias", ".rotary_emb.inv_freq")  # buffers some exports carry


def to_ours(key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return resampler.to_ours(key, t, POOL, PROJ)


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return resampler.to_original(state, POOL, PROJ)


def load_weights(model: QWenLMHeadModel, folder: str) -> None:
    load_state(model, folder, "Qwen-VL", allow_bin=True, rename=to_ours, renamed=resampler.original_keys(POOL, PROJ),
               skip=lambda k: k.endswith(IGNORED))


def load(folder: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[QWenLMHeadModel, QWenVLProcessor]:
    raw = read_config(folder)
    cfg = QWenConfig.from_dict(raw, where=os.path.join(folder, "config.json"))
    tokenizer = QWenTokenizer(folder)
    if tokenizer.img_start_id != cfg.visual.image_start_id:
        raise ValueError(f"{folder}: the tokenizer's <img> has id {tokenizer.img_start_id} but config.json's "
                         f"visual.image_start_id is {cfg.visual.image_start_id}: qwen.tiktoken does not belong to "
                         "these weights")
    if tokenizer.n_vocab > cfg.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.n_vocab} ids but the embedding only "
                         f"{cfg.vocab_size} rows")
    model = build_empty(lambda: QWenLMHeadModel(cfg), device, dtype)
    load_weights(model, folder)
    model.generation_eos = (*tokenizer.stop_ids, tokenizer.eod_id)
    model.pad_token_id = tokenizer.eod_id
    return model.eval(), QWenVLProcessor(tokenizer, cfg)
