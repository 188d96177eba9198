"""Qwen-VL-Chat's config.json (``QWenLMHeadModel``, ``model_type`` "qwen"), read into dataclasses (no remote code).

The language model's fields sit at the top level; the vision tower's in the ``visual`` sub-dict. Field names
are the original ones; a field the file leaves out takes the original config class's default. Two widths
are easy to get wrong: ``intermediate_size`` is twice the MLP width (``w1`` / ``w2`` have
``intermediate_size // 2`` outputs), and the ViT MLP width is ``int(width * mlp_ratio)``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class VisualConfig:
    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    n_queries: int = 256
    image_start_id: int = 151857

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def resampler_heads(self) -> int:
        return self.output_dim // 128  # fixed head width of 128 in the original resampler


@dataclass
class QWenConfig:
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    layer_norm_epsilon: float = 1e-6
    no_bias: bool = True
    vocab_size: int = 151936
    tie_word_embeddings: bool = False
    visual: VisualConfig = None  # type: ignore[assignment]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "QWenConfig":
        archs = d.get("architectures") or []
        if archs and "QWenLMHeadModel" not in archs:
            raise ValueError(f"{where}: architectures {archs} is not Qwen-VL's QWenLMHeadModel")
        if d.get("quantization_config"):
            raise ValueError(f"{where}: this checkpoint is already quantized ({d['quantization_config'].get('quant_method', '?')}, "
                             "e.g. Qwen-VL-Chat-Int4); give the floating-point Qwen-VL-Chat folder")
        if "visual" not in d:
            raise ValueError(f"{where} has no 'visual' section: this is a text-only Qwen checkpoint, not Qwen-VL")
        names = {f.name for f in fields(cls)} - {"visual"}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        vnames = {f.name for f in fields(VisualConfig)}
        cfg.visual = VisualConfig(**{k: v for k, v in d["visual"].items() if k in vnames})
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        v = self.visual
        problems = []
        if self.rotary_pct != 1.0:
            problems.append(f"rotary_pct {self.rotary_pct} (only 1.0, RoPE on the whole head, is supported)")
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            problems.append(f"kv_channels {self.kv_channels} x {self.num_attention_heads} heads != hidden_size "
                            f"{self.hidden_size}")
        if v.output_dim != self.hidden_size:
            problems.append(f"visual.output_dim {v.output_dim} != hidden_size {self.hidden_size}")
        if v.output_dim % 128 or v.resampler_heads == 0:
            problems.append(f"visual.output_dim {v.output_dim} is not a multiple of the resampler's 128-wide heads")
        if v.width % v.heads:
            problems.append(f"visual.width {v.width} is not divisible by visual.heads {v.heads}")
        if v.n_queries != 256:
            problems.append(f"visual.n_queries {v.n_queries}: the tokenizer's image span holds 256 slots")
        if problems:
            raise ValueError(f"{where}: unsupported Qwen-VL config: " + "; ".join(problems))
