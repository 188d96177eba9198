"""Tiny random Qwen-VL-Chat checkpoints, written in the original format, for tests and smoke runs.

:func:`write_checkpoint` produces what a user's Qwen-VL-Chat folder holds: ``config.json`` with
``QWenLMHeadModel`` and the ``visual`` sub-dict, safetensors shards with the original tensor names (the
resampler's packed ``in_proj_weight``, ``visual.proj`` as an ``[in, out]`` matrix), an index, a small
``qwen.tiktoken`` (the 256 bytes in the original order plus merges learned on a small corpus) and
``generation_config.json``. Loading then goes through exactly the code real checkpoints use.
Widths keep non-power-of-two Hadamard factors: ViT 48 = 12 * 4 (MLP 96, heads of 24), LLM 384 = 12 * 32
(MLP 320 = 20 * 16, heads of 96); the resampler has 384 / 128 = 3 heads, and the 56-px images give a 4 x 4
grid, so both stored 16 x 16 position tables are resized on every call, as at 448 px.
"""
from __future__ import annotations

import json
import os

import torch

from ..tiny_folders import cached_checkpoint, save_shards

# SynthBench-style questions and answers, for the tiny tokenizer's merges
CORPUS = """What is written in the image? Answer the question using a single word or phrase.
Is there a red circle in the image? Please answer yes or no. yes no
What color is the square? red green blue yellow white black orange purple
How many triangles are there? one two three four five six seven eight nine ten
You are a helpful assistant. system user assistant Picture 1: 2: 3:
Read the text: HELLO WORLD 2024 OCR BENCH DOCUMENT INVOICE TOTAL PRICE DATE
"""
SPECIALS = 217  # <|endoftext|>, <|im_start|>, <|im_end|>, 205 extras, ref/box/quad pairs, <img>, </img>, <imgpad>


def visual_config(llm_hidden: int, image_start_id: int, **overrides) -> dict:
    cfg = dict(image_size=56, patch_size=14, width=48, layers=2, heads=2, mlp_ratio=2.0, output_dim=llm_hidden,
               image_start_id=image_start_id)
    cfg.update(overrides)
    return cfg


def qwen_config(vocab: int, image_start_id: int, **overrides) -> dict:
    visual = overrides.pop("visual", {})
    cfg = dict(architectures=["QWenLMHeadModel"], model_type="qwen",
               auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
               hidden_size=384, num_hidden_layers=2, num_attention_heads=4, kv_channels=96, intermediate_size=640,
               rotary_pct=1.0, rotary_emb_base=10000, seq_length=2048, max_position_embeddings=8192,
               use_dynamic_ntk=True, use_logn_attn=True, layer_norm_epsilon=1e-6, no_bias=True, vocab_size=vocab,
               tie_word_embeddings=False, bf16=False, fp16=False, fp32=False, emb_dropout_prob=0.0,
               attn_dropout_prob=0.0, scale_attn_weights=True, initializer_range=0.02, tokenizer_type="QWenTokenizer")
    cfg.update(overrides)
    cfg["visual"] = visual_config(cfg["hidden_size"], image_start_id, **visual)
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights, norms away from 1 and biases away from 0 (fresh values would hide fusion mistakes); the
    resampler's fixed sin-cos table as the original computes it."""
    from ..resampler import sincos_2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn_pool.pos_embed"):
                p.copy_(sincos_2d(p.shape[1], 16, 16))
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "ln_pre.weight", "ln_post.weight",
                                "ln_q.weight", "ln_kv.weight")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("positional_embedding", "attn_pool.query")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / (fan_in ** 0.5 if p.dim() > 1 else 1.0))


def write_checkpoint(folder: str, seed: int = 0, shards: int = 2, drop: tuple[str, ...] = (),
                     reshape: dict[str, tuple[int, ...]] | None = None, fmt: str = "safetensors",
                     **overrides) -> str:
    """Write a tiny random Qwen-VL-Chat checkpoint into ``folder``. ``drop`` / ``reshape`` corrupt named
    (original) tensors, for testing the loader's errors; ``fmt="bin"`` writes one ``pytorch_model.bin``;
    ``overrides`` go to config.json (``visual={...}`` to its visual section)."""
    from .config import QWenConfig
    from .loading import to_original
    from .modeling import QWenLMHeadModel
    from .tokenizer import write_tiny_tiktoken

    os.makedirs(folder, exist_ok=True)
    ranks = write_tiny_tiktoken(folder, CORPUS)
    n_vocab = ranks + SPECIALS
    raw = qwen_config(-(-n_vocab // 64) * 64, image_start_id=ranks + 214, **overrides)  # padded rows, as the original
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"chat_format": "chatml", "eos_token_id": ranks, "pad_token_id": ranks, "max_window_size": 6144,
                   "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.3}, f, indent=1)
    torch.manual_seed(seed)
    model = QWenLMHeadModel(QWenConfig.from_dict(raw))
    randomize(model, seed)
    state = {k: v for k, v in to_original(model.state_dict()).items() if k not in drop}
    for k, shape in (reshape or {}).items():
        state[k] = torch.zeros(shape)
    if fmt == "bin":
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    else:
        save_shards(state, folder, shards)
    return folder


def builtin_folder() -> str:
    """The tiny checkpoint behind ``--model_path tiny``, written once into the cache."""
    here = os.path.dirname(__file__)
    sources = [os.path.join(here, f) for f in ("tiny.py", "modeling.py", "qwen.py", "vision.py", "tokenizer.py")]
    return cached_checkpoint("tiny-qwenvl", sources, lambda folder: write_checkpoint(folder))
