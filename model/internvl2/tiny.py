"""Tiny random InternVL2 checkpoints, written in the original format, for tests and smoke runs.

:func:`write_checkpoint` produces what a user's InternVL2 folder holds -- ``config.json`` with
``InternVLChatModel``, ``vision_config`` and ``llm_config``; safetensors shards with the original
tensor names (plus ``model.safetensors.index.json`` when sharded); a tokenizer (SentencePiece
``tokenizer.model`` + ``tokenizer_config.json`` for InternLM2, ``vocab.json`` + ``merges.txt`` +
``tokenizer_config.json`` for Qwen2) with the chat and image tokens -- so loading goes through exactly the code real checkpoints use.
Widths keep non-power-of-two Hadamard factors (ViT 48 = 12 * 4, LLM 80 = 20 * 4, head dims 24 / 20).
"""
from __future__ import annotations

import json
import os

import torch

from ..tiny_folders import cached_checkpoint, save_shards, write_bpe_tokenizer

ADDED_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>",
                "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SP_VOCAB = 320

# a small English corpus for the tokenizers: SynthBench-style questions and answers
_CORPUS = """What is written in the image? Answer the question using a single word or phrase.
Is there a red circle in the image? Please answer yes or no. yes no
What color is the square? red green blue yellow white black orange purple
How many triangles are there? one two three four five six seven eight nine ten
The quick brown fox jumps over the lazy dog. A picture of a cat sitting on a mat.
Which shape is on the left of the star? circle square triangle star hexagon
Read the text: HELLO WORLD 2024 OCR BENCH DOCUMENT INVOICE TOTAL PRICE DATE
"""


def vision_config(**overrides) -> dict:
    cfg = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=48, intermediate_size=96,
               num_attention_heads=2, num_hidden_layers=2, num_channels=3, patch_size=14, image_size=56,
               qkv_bias=True, qk_normalization=False, norm_type="layer_norm", layer_norm_eps=1e-6, hidden_act="gelu",
               drop_path_rate=0.0)
    cfg.update(overrides)
    return cfg


def internlm2_config(vocab: int, **overrides) -> dict:
    cfg = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", hidden_size=80, intermediate_size=160,
               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=vocab,
               rms_norm_eps=1e-5, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0},
               max_position_embeddings=4096, hidden_act="silu", bias=False, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=2, attn_implementation="eager")
    cfg.update(overrides)
    return cfg


def qwen2_config(vocab: int, **overrides) -> dict:
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=80, intermediate_size=160,
               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=vocab, rms_norm_eps=1e-6,
               rope_theta=1e6, max_position_embeddings=4096, hidden_act="silu", tie_word_embeddings=False,
               bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="flash_attention_2",
               use_sliding_window=False)
    cfg.update(overrides)
    return cfg


def chat_config(vision: dict, llm: dict, template: str, **overrides) -> dict:
    cfg = dict(architectures=["InternVLChatModel"], model_type="internvl_chat", downsample_ratio=0.5, ps_version="v2",
               select_layer=-1, force_image_size=vision["image_size"], dynamic_image_size=True, use_thumbnail=True,
               min_dynamic_patch=1, max_dynamic_patch=4, template=template, vision_config=vision, llm_config=llm)
    cfg.update(overrides)
    return cfg


def write_sentencepiece(folder: str) -> int:
    """A SentencePiece ``tokenizer.model`` (ids 0-2: unk, bos, eos) with the added tokens after its vocabulary;
    returns the vocabulary size including them."""
    import sentencepiece as spm

    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(_CORPUS * 4)
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(folder, "tokenizer"), vocab_size=SP_VOCAB,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, byte_fallback=True, minloglevel=2, num_threads=1,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=False, allow_whitespace_only_pieces=True)
    os.remove(corpus)
    os.remove(os.path.join(folder, "tokenizer.vocab"))
    decoder = {str(SP_VOCAB + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                   "normalized": False, "single_word": False} for i, t in enumerate(ADDED_TOKENS)}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "InternLM2Tokenizer", "add_bos_token": True, "add_eos_token": False,
                   "added_tokens_decoder": decoder, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
                   "unk_token": "<unk>", "clean_up_tokenization_spaces": False}, f, indent=1)
    return SP_VOCAB + len(ADDED_TOKENS)


def write_qwen2_tokenizer(folder: str) -> int:
    """A byte-level BPE (``vocab.json`` + ``merges.txt``) for transformers' Qwen2 tokenizer, the chat and image
    tokens and ``<|endoftext|>`` after it in ``tokenizer_config.json``; returns the vocabulary size."""
    return write_bpe_tokenizer(folder, _CORPUS, [*ADDED_TOKENS, "<|endoftext|>"], SP_VOCAB, {
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 4096})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms and LayerScales away from 1 / 0 (fresh values would hide fusion mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "_norm.weight", "mlp1.0.weight")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith((".ls1", ".ls2")):
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("position_embedding") or name.endswith("class_embedding"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or "mlp1.0" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / (fan_in ** 0.5 if p.dim() > 1 else 1.0))


def write_checkpoint(folder: str, llm: str = "internlm2", seed: int = 0, shards: int = 2, drop: tuple[str, ...] = (),
                     reshape: dict[str, tuple[int, ...]] | None = None, **overrides) -> str:
    """Write a tiny random InternVL2 checkpoint into ``folder``. ``drop`` / ``reshape`` corrupt named
    tensors (for testing the loader's errors); ``overrides`` go to the top-level config."""
    from .config import InternVLConfig
    from .loading import build

    os.makedirs(folder, exist_ok=True)
    if llm == "internlm2":
        vocab = write_sentencepiece(folder)
        llm_cfg, template = internlm2_config(vocab), "internlm2-chat"
    elif llm == "qwen2":
        vocab = write_qwen2_tokenizer(folder)
        llm_cfg, template = qwen2_config(vocab), "Hermes-2"
    else:
        raise ValueError(f"tiny InternVL2 language model {llm!r}: use 'internlm2' or 'qwen2'")
    raw = chat_config(vision_config(**overrides.pop("vision", {})), {**llm_cfg, **overrides.pop("llm", {})},
                      template, **overrides)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    cfg = InternVLConfig.from_dict(raw)
    torch.manual_seed(seed)
    model = build(cfg, "cpu", torch.float32)
    randomize(model, seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    for k, shape in (reshape or {}).items():
        state[k] = torch.zeros(shape)
    save_shards(state, folder, shards)
    return folder


def builtin_folder(llm: str = "internlm2") -> str:
    """The tiny checkpoint behind ``--model_path tiny`` (``tiny-qwen2`` for the Qwen2 variant), written once
    into the cache (``$MQUANT_CACHE`` or ``~/.cache/mquant``)."""
    here = os.path.dirname(__file__)
    return cached_checkpoint(f"tiny-internvl2-{llm}", [__file__, os.path.join(here, "modeling.py")],
                             lambda folder: write_checkpoint(folder, llm=llm))
