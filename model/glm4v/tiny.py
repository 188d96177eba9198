"""Tiny random GLM-4V checkpoints, written in the original format, for tests and smoke runs.

:func:`write_checkpoint` produces what a user's glm-4v-9b folder holds: ``config.json`` with ``ChatGLMModel``, the
top-level GLM fields and the ``vision_config`` dict, safetensors shards with the original tensor names (including
the unused ``rotary_pos_emb.inv_freq`` buffer), an index, a small ``tokenizer.model`` (the 256 bytes plus merges
learned on a small corpus), ``tokenizer_config.json`` with the added tokens' ids and ``generation_config.json``.
Loading then goes through exactly the code real checkpoints use. Widths keep non-power-of-two Hadamard factors:
tower 48 = 12 * 4 (2 heads of 24, MLP 80 = 20 * 4), LLM 96 = 12 * 8 (4 heads of 24 in 2 KV groups, MLP and
GLU 80); 84-px images give a 6 x 6 patch grid and 3 x 3 = 9 image features.
"""
from __future__ import annotations

import json
import os

import torch

from ..qwenvl.tiny import CORPUS
from ..tiny_folders import cached_checkpoint, save_shards

GLM_CORPUS = CORPUS + "Short Answer. What is the number 12345 in the picture? 2024 07 31\n"


def vision_config(**overrides) -> dict:
    cfg = dict(dropout_prob=0.0, hidden_act="gelu", hidden_size=48, image_size=84, in_channels=3,
               intermediate_size=80, layer_norm_eps=1e-6, num_heads=2, num_hidden_layers=2, num_positions=37,
               patch_size=14, scaling_factor=8)
    cfg.update(overrides)
    return cfg


def glm_config(vocab: int, specials: dict[str, int], **overrides) -> dict:
    """config.json as the original spells it (the LLM's fields at the top, the tower's in ``vision_config``)."""
    vision = overrides.pop("vision_config", {})
    cfg = dict(_name_or_path="THUDM/glm-4v-9b", add_bias_linear=False, add_qkv_bias=True,
               apply_query_key_layer_scaling=True, apply_residual_connection_post_layernorm=False,
               architectures=["ChatGLMModel"], attention_dropout=0.0, attention_softmax_in_fp32=True,
               attn_implementation="sdpa",
               auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
               bias_dropout_fusion=True, boi_token_id=specials["<|begin_of_image|>"],
               eoi_token_id=specials["<|end_of_image|>"], classifier_dropout=None, ffn_hidden_size=80,
               fp32_residual_connection=False, hidden_dropout=0.0, hidden_size=96, kv_channels=24,
               layernorm_epsilon=1.5625e-07, model_type="chatglm", multi_query_attention=True,
               multi_query_group_num=2, num_attention_heads=4, num_layers=2, original_rope=True,
               padded_vocab_size=vocab, post_layer_norm=True, pre_seq_len=None, prefix_projection=False,
               rmsnorm=True, seq_length=8192, use_cache=True, torch_dtype="bfloat16", transformers_version="4.40.2",
               tie_word_embeddings=False,
               eos_token_id=[specials["<|endoftext|>"], specials["<|user|>"], specials["<|observation|>"]],
               pad_token_id=specials["<|endoftext|>"])
    cfg.update(overrides)
    cfg["vision_config"] = vision_config(**vision)
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights, norms away from 1 and biases away from 0 (fresh values would hide fusion mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layernorm.weight", "norm1.weight")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("cls_embedding", "position_embedding.weight", "boi", "eoi")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / (fan_in ** 0.5 if p.dim() > 1 else 1.0))


def write_tokenizer(folder: str, image_size: int = 84) -> dict[str, int]:
    """``tokenizer.model`` and ``tokenizer_config.json`` (added tokens after the ranks, as the original's)."""
    from ..qwenvl.tokenizer import write_tiny_tiktoken
    from .tokenizer import PAT_STR, SPECIAL_TOKENS, VOCAB_FILE

    ranks = write_tiny_tiktoken(folder, GLM_CORPUS, filename=VOCAB_FILE, pat_str=PAT_STR)
    specials = {tok: ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}
    added = {str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for tok, i in specials.items()}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"added_tokens_decoder": added, "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
                   "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
                   "clean_up_tokenization_spaces": False, "do_lower_case": False, "eos_token": "<|endoftext|>",
                   "image_size": image_size, "model_input_names": ["input_ids", "attention_mask", "position_ids"],
                   "model_max_length": 1000000000000000019884624838656, "pad_token": "<|endoftext|>",
                   "padding_side": "left", "remove_space": False, "tokenizer_class": "ChatGLM4Tokenizer"}, f, indent=1)
    return specials


def write_checkpoint(folder: str, seed: int = 0, shards: int = 2, drop: tuple[str, ...] = (),
                     reshape: dict[str, tuple[int, ...]] | None = None, **overrides) -> str:
    """Write a tiny random GLM-4V checkpoint into ``folder``. ``drop`` / ``reshape`` corrupt named tensors, for
    testing the loader's errors; ``overrides`` go to config.json (``vision_config={...}`` to its tower section)."""
    from .config import ChatGLMConfig
    from .modeling import ChatGLMForConditionalGeneration

    os.makedirs(folder, exist_ok=True)
    specials = write_tokenizer(folder, vision_config(**overrides.get("vision_config", {}))["image_size"])
    n_vocab = max(specials.values()) + 1
    raw = glm_config(-(-n_vocab // 64) * 64, specials, **overrides)  # padded rows, as the original
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "eos_token_id": raw["eos_token_id"], "max_length": 8192,
                   "pad_token_id": raw["pad_token_id"], "temperature": 0.8, "top_p": 0.8}, f, indent=1)
    torch.manual_seed(seed)
    cfg = ChatGLMConfig.from_dict(raw)
    model = ChatGLMForConditionalGeneration(cfg)
    randomize(model, seed)
    state = {k: v for k, v in model.state_dict().items() if k not in drop}
    # the buffer real GLM-4 checkpoints carry (base 10000 whatever rope_ratio says); the loader skips it
    d = cfg.rotary_dim
    state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    for k, shape in (reshape or {}).items():
        state[k] = torch.zeros(shape)
    save_shards(state, folder, shards)
    return folder


def builtin_folder() -> str:
    """The tiny checkpoint behind ``--model_path tiny``, written once into the cache."""
    here = os.path.dirname(__file__)
    sources = [os.path.join(here, f) for f in ("tiny.py", "modeling.py", "glm.py", "vision.py", "tokenizer.py")]
    return cached_checkpoint("tiny-glm4v", sources, lambda folder: write_checkpoint(folder))
