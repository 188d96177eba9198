"""Tiny random MiniCPM-V 2.6 checkpoints, written in the original format, for tests and smoke runs.

:func:`write_checkpoint` writes what a user's MiniCPM-V-2_6 folder holds: ``config.json`` (``MiniCPMV``, the Qwen2
fields at the top level, ``vision_config``, ``slice_config``), safetensors shards with the original tensor names
(``vpm.*``, ``resampler.*`` with the packed ``attn.in_proj_weight`` and the raw ``proj``, ``llm.*``), an index, and
Qwen2 tokenizer files (``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` with the added tokens, ``<unk>``
and a chatml ``chat_template``). Widths keep non-power-of-two Hadamard factors: tower 48 = 12 * 4 (MLP 80 = 20 * 4,
heads of 24), LLM 384 = 12 * 32 (3 resampler heads of 128; MLP 320 = 20 * 16; 4 heads of 96, 2 KV heads). The
position table is 6 x 6 patches and ``scale_resolution`` 56 px, so the built-in 64-px images are sliced.
"""
from __future__ import annotations

import json
import os

import torch

from ..tiny_folders import cached_checkpoint, save_shards, write_bpe_tokenizer

CORPUS = """What is written in the image? Answer the question using a single word or phrase.
Is there a red circle in the image? Please answer yes or no. yes no
What color is the square? red green blue yellow white black orange purple
How many triangles are there? one two three four five six seven eight nine ten
Read the following question carefully, solve it step by step, and then output the final answer.
"""
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>",
         "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>"]
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def config(vocab: int, **overrides) -> dict:
    vision = overrides.pop("vision", {})
    cfg = dict(architectures=["MiniCPMV"], model_type="minicpmv", version=2.6,
               auto_map={"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                         "AutoModel": "modeling_minicpmv.MiniCPMV"},
               hidden_size=384, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
               vocab_size=vocab, tie_word_embeddings=False, bos_token_id=vocab - 18, eos_token_id=vocab - 16,
               use_sliding_window=False, max_window_layers=2, query_num=16, image_size=56, patch_size=14,
               drop_vision_last_layer=False, batch_vision_input=True, slice_mode=True, use_image_id=True,
               vision_batch_size=16,
               slice_config={"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv", "scale_resolution": 56},
               vision_config={"hidden_size": 48, "image_size": 84, "intermediate_size": 80, "num_attention_heads": 2,
                              "num_hidden_layers": 2, "patch_size": 14, "model_type": "siglip_vision_model", **vision})
    cfg.update(overrides)
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights, norms away from 1 and biases away from 0 (fresh values would hide fusion mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.rsplit(".", 2)[-2] or name.rsplit(".", 2)[-2].startswith("ln_"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("position_embedding.weight", "resampler.query")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def write_checkpoint(folder: str, seed: int = 0, shards: int = 2, drop: tuple[str, ...] = (),
                     reshape: dict[str, tuple[int, ...]] | None = None, **overrides) -> str:
    """Write a tiny random MiniCPM-V 2.6 checkpoint into ``folder``. ``drop`` / ``reshape`` corrupt named
    (original) tensors, for testing the loader's errors; ``overrides`` go to config.json."""
    from .config import MiniCPMVConfig
    from .loading import build, to_original

    os.makedirs(folder, exist_ok=True)
    vocab = write_bpe_tokenizer(folder, CORPUS, ADDED, 300, {
        "tokenizer_class": "MiniCPMVTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "bos_token": "<|im_start|>", "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "chat_template": CHAT_TEMPLATE,
        "auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]}})
    raw = config(vocab, **overrides)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)
    sl = raw["slice_config"]
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:  # what the original processor reads
        json.dump({"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
                   "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                                "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
                   "max_slice_nums": sl["max_slice_nums"], "scale_resolution": sl["scale_resolution"],
                   "patch_size": raw["patch_size"], "use_image_id": raw["use_image_id"],
                   "image_feature_size": raw["query_num"], "im_start": "<image>", "im_end": "</image>",
                   "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>", "im_id_start": "<image_id>",
                   "im_id_end": "</image_id>", "slice_mode": True, "norm_mean": [0.5, 0.5, 0.5],
                   "norm_std": [0.5, 0.5, 0.5], "version": 2.6}, f, indent=1)
    torch.manual_seed(seed)
    model = build(MiniCPMVConfig.from_dict(raw), "cpu", torch.float32)
    randomize(model, seed)
    state = {k: v.detach().clone() for k, v in to_original(model.state_dict()).items() if k not in drop}
    for k, shape in (reshape or {}).items():
        state[k] = torch.zeros(shape)
    save_shards(state, folder, shards)
    return folder


def builtin_folder() -> str:
    here = os.path.dirname(__file__)
    sources = [os.path.join(here, f) for f in ("tiny.py", "modeling.py", "vision.py", "loading.py")]
    return cached_checkpoint("tiny-minicpmv", sources, lambda folder: write_checkpoint(folder))
