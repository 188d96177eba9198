"""Load a GLM-4V checkpoint folder (config.json + safetensors shards + ``tokenizer.model``) into our modules.

Our parameter names are the original ``transformer.*`` keys, so every tensor is copied by its own name; the one
key skipped is the RoPE buffer ``transformer.rotary_pos_emb.inv_freq``, which the original forward never reads
(its angles are recomputed with rope_ratio). A missing or misshaped tensor is an error that names it.
"""
from __future__ import annotations

import os

import torch

from ..base import read_config
from ..weights import build_empty, load_state
from .config import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration
from .processor import GLM4VProcessor
from .tokenizer import GLM4Tokenizer

IGNORED = ("transformer.rotary_pos_emb.inv_freq",)


def load_weights(model: ChatGLMForConditionalGeneration, folder: str) -> None:
    load_state(model, folder, "GLM-4V", allow_bin=True, skip=lambda k: k in IGNORED)


def load(folder: str, device: str = "cpu", dtype: torch.dtype = torch.float32
         ) -> tuple[ChatGLMForConditionalGeneration, GLM4VProcessor]:
    raw = read_config(folder)
    cfg = ChatGLMConfig.from_dict(raw, where=os.path.join(folder, "config.json"))
    tokenizer = GLM4Tokenizer(folder)
    if (tokenizer.boi_id, tokenizer.eoi_id) != (cfg.boi_token_id, cfg.eoi_token_id):
        raise ValueError(f"{folder}: the tokenizer's image tokens have ids {tokenizer.boi_id}, {tokenizer.eoi_id} but "
                         f"config.json says boi_token_id {cfg.boi_token_id}, eoi_token_id {cfg.eoi_token_id}: "
                         "tokenizer.model does not belong to these weights")
    if tokenizer.n_vocab > cfg.padded_vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.n_vocab} ids but the embedding only "
                         f"{cfg.padded_vocab_size} rows")
    model = build_empty(lambda: ChatGLMForConditionalGeneration(cfg), device, dtype)
    load_weights(model, folder)
    # config.json's eos list is generation_config.json's (<|endoftext|>, <|user|>, <|observation|>); an older file
    # with a single id would let a reply run past <|user|>
    model.generation_eos = tuple(dict.fromkeys((*cfg.eos_ids, *tokenizer.stop_ids)))
    if model.pad_token_id is None:
        model.pad_token_id = tokenizer.eot_id
    return model.eval(), GLM4VProcessor(tokenizer, cfg)
