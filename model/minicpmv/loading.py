"""Load a MiniCPM-V 2.6 checkpoint folder (config.json + safetensors shards + the Qwen2 tokenizer files).

Every tensor comes from the checkpoint by its original name (``vpm.*``, ``resampler.*``, ``llm.*``); the
resampler's packed attention in-projection and raw ``proj`` are mapped (:mod:`model.resampler`). The resampler's
sin-cos table is not stored (a non-persistent buffer in the original); it is recomputed. A missing or misshaped
tensor is an error that names it; tensors of a dropped last vision layer are skipped.
"""
from __future__ import annotations

import logging
import os

import torch

from .. import resampler
from ..base import read_config
from ..weights import default_dtype, load_state
from .config import MiniCPMVConfig
from .modeling import MiniCPMV, qwen2_language_model
from .processor import MiniCPMVProcessor

log = logging.getLogger("mquant")

ATTN, PROJ = "resampler.attn", "resampler.proj"
SPAN_TOKENS = ("<image>", "</image>", "<slice>", "</slice>")


def to_ours(key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return resampler.to_ours(key, t, ATTN, PROJ)


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return resampler.to_original(state, ATTN, PROJ)


def load_tokenizer(folder: str):
    """The folder's Qwen2 byte-level BPE through transformers' own Qwen2 tokenizer (the checkpoint names its remote
    ``MiniCPMVTokenizerFast``, which adds nothing but attribute names), with the tokens the model needs checked."""
    from transformers import Qwen2Tokenizer

    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(f"{folder} has no tokenizer.json or vocab.json + merges.txt: copy the tokenizer files "
                                "of the original MiniCPM-V-2_6 checkpoint")
    tok = Qwen2Tokenizer.from_pretrained(folder)
    vocab = tok.get_vocab()
    missing = [t for t in (*SPAN_TOKENS, "<image_id>", "</image_id>", "<unk>", "<|im_end|>", "<|endoftext|>")
               if t not in vocab]
    if missing:
        raise ValueError(f"{folder}: the tokenizer lacks {missing}: these are not MiniCPM-V 2.6 tokenizer files")
    if tok.unk_token != "<unk>":
        tok.unk_token = "<unk>"
    if not tok.chat_template:
        raise ValueError(f"{folder}/tokenizer_config.json has no chat_template: copy the original file")
    return tok


def build(cfg: MiniCPMVConfig, device: str, dtype: torch.dtype) -> MiniCPMV:
    with default_dtype(dtype):
        llm = qwen2_language_model(cfg).to(device)
    with torch.device("meta"), default_dtype(dtype):
        model = MiniCPMV(cfg, llm=torch.nn.Identity())
    model = model.to_empty(device=device)
    model.llm = llm
    return model


def load_weights(model: MiniCPMV, folder: str) -> None:
    used = model.config.vision_layers

    def dropped(key: str) -> bool:  # the dropped last vision layer
        return key.startswith("vpm.encoder.layers.") and int(key.split(".")[3]) >= used

    load_state(model, folder, "MiniCPM-V 2.6", rename=to_ours, renamed=resampler.original_keys(ATTN, PROJ),
               skip=dropped)


def load(folder: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
         max_slice_nums: int | None = None) -> tuple[MiniCPMV, MiniCPMVProcessor]:
    raw = read_config(folder)
    cfg = MiniCPMVConfig.from_dict(raw, where=os.path.join(folder, "config.json"))
    tok = load_tokenizer(folder)
    model = build(cfg, device, dtype)
    load_weights(model, folder)
    ids = [tok.convert_tokens_to_ids(t) for t in SPAN_TOKENS]
    vocab = model.llm.get_input_embeddings().num_embeddings
    if max(ids) >= vocab:
        raise ValueError(f"{folder}: the tokenizer's image tokens reach id {max(ids)} but the embedding has {vocab} rows: "
                         "the tokenizer does not belong to these weights")
    model.span_pairs = ((ids[0], ids[1]), (ids[2], ids[3]))
    model.generation_eos = tuple(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    return model.eval(), MiniCPMVProcessor(tok, cfg, max_slice_nums)
