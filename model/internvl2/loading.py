"""Load an InternVL2 checkpoint folder (config.json + safetensors shards + tokenizer) into our modules.

Every tensor of the model must come from the checkpoint with the same name and shape; a missing or
misshaped tensor is an error that names it. Tensors of vision layers after ``select_layer`` are not
needed and skipped; other unknown tensors are reported and ignored.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..base import read_config
from ..weights import default_dtype, load_state
from .config import InternVLConfig
from .modeling import InternVLChatModel, qwen2_language_model
from .processor import InternVLProcessor
from .tokenizer import load_tokenizer

log = logging.getLogger("mquant")


def build(cfg: InternVLConfig, device: str, dtype: torch.dtype) -> InternVLChatModel:
    """The model with uninitialized weights (to be filled by :func:`load_weights`)."""
    language_model = None
    if cfg.llm_kind == "qwen2":
        with default_dtype(dtype):
            language_model = qwen2_language_model(cfg).to(device)
    with torch.device("meta"), default_dtype(dtype):
        model = InternVLChatModel(cfg, language_model=nn.Identity() if language_model is not None else None)
    model = model.to_empty(device=device)
    if language_model is not None:
        model.language_model = language_model
    return model


def load_weights(model: InternVLChatModel, folder: str) -> None:
    used_layers = len(model.vision_model.encoder.layers)
    head = "language_model.lm_head.weight"
    tied = model.config.llm_kind == "qwen2"

    def after_select_layer(key: str) -> bool:  # never used
        return key.startswith("vision_model.encoder.layers.") and int(key.split(".")[3]) >= used_layers

    loaded = load_state(model, folder, "InternVL2", skip=after_select_layer, optional=lambda k: tied and k == head)
    if tied and head not in loaded:  # tied output layer: only the embedding is stored
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        log.info("%s: no %s in the checkpoint; the output layer shares the input embedding", folder, head)


def load(folder: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
         max_num: int | None = None) -> tuple[InternVLChatModel, InternVLProcessor]:
    raw = read_config(folder)
    cfg = InternVLConfig.from_dict(raw, where=os.path.join(folder, "config.json"))
    tokenizer = load_tokenizer(folder, cfg.llm_kind)
    model = build(cfg, device, dtype)
    load_weights(model, folder)
    processor = InternVLProcessor(tokenizer, cfg, max_num=max_num)
    model.img_context_token_id = processor.context_id
    eos = getattr(tokenizer, "eos_token_id", None)
    model.generation_eos = tuple(dict.fromkeys([*processor.stop_ids, *([eos] if eos is not None else [])]))
    vocab = model.language_model.get_input_embeddings().num_embeddings
    if processor.context_id >= vocab:
        raise ValueError(f"{folder}: <IMG_CONTEXT> has id {processor.context_id} but the embedding has {vocab} rows: "
                         "the tokenizer does not belong to these weights")
    return model.eval(), processor
