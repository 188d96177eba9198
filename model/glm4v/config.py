"""GLM-4V's config.json (``ChatGLMModel``, ``model_type`` "chatglm", with a ``vision_config`` dict), read into
dataclasses (no remote code).

The language model's fields sit at the top level under their original names; the tower's in ``vision_config``.
A field the file leaves out takes the original config class's default -- which is not always GLM-4V's value
(the class defaults to 28 layers, eps 1e-5, no GQA), so a real config.json states them all. ``rope_ratio`` is
absent from glm-4v-9b's file: RoPE base 10000 * 1.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

ARCHITECTURE = "ChatGLMModel"


@dataclass
class VisionConfig:
    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    image_size: int = 1120
    patch_size: int = 14
    in_channels: int = 3
    num_positions: int = 6401
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    dropout_prob: float = 0.0
    scaling_factor: float = 8

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        """Feature vectors per image after the 2x2 stride-2 conv (1600 at 1120 px), boi / eoi not counted."""
        return (self.grid // 2) ** 2


@dataclass
class ChatGLMConfig:
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    ffn_hidden_size: int = 13696
    padded_vocab_size: int = 65024
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    apply_residual_connection_post_layernorm: bool = False
    original_rope: bool = True
    rope_ratio: float = 1.0
    seq_length: int = 2048
    pre_seq_len: int | None = None
    fp32_residual_connection: bool = False
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    vision: VisionConfig = None  # type: ignore[assignment]

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def projection_size(self) -> int:
        return self.kv_channels * self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        return self.projection_size + 2 * self.kv_channels * self.num_kv_heads

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates: half of them (``RotaryEmbedding(kv_channels // 2)``)."""
        return self.kv_channels // 2

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else ((e,) if isinstance(e, int) else tuple(e))

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "ChatGLMConfig":
        archs = d.get("architectures") or []
        if archs and ARCHITECTURE not in archs and "ChatGLMForConditionalGeneration" not in archs:
            raise ValueError(f"{where}: architectures {archs} is not GLM-4V's {ARCHITECTURE}")
        if d.get("quantization_config"):
            raise ValueError(f"{where}: this checkpoint is already quantized "
                             f"({d['quantization_config'].get('quant_method', '?')}); give the floating-point "
                             "glm-4v-9b folder")
        if not isinstance(d.get("vision_config"), dict):
            raise ValueError(f"{where} has no 'vision_config' section: this is a text-only ChatGLM / GLM-4 "
                             "checkpoint, not GLM-4V")
        names = {f.name for f in fields(cls)} - {"vision"}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.rope_ratio is None:
            cfg.rope_ratio = 1.0
        vnames = {f.name for f in fields(VisionConfig)}
        cfg.vision = VisionConfig(**{k: v for k, v in d["vision_config"].items() if k in vnames})
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        v = self.vision
        problems = []
        for flag, want, what in (("rmsnorm", True, "LayerNorm decoders"),
                                 ("post_layer_norm", True, "a decoder without its final norm"),
                                 ("apply_residual_connection_post_layernorm", False, "residuals taken after the norm"),
                                 ("original_rope", True, "the non-interleaved RoPE variant"),
                                 ("fp32_residual_connection", False, "a float32 residual stream")):
            if bool(getattr(self, flag)) != want:
                problems.append(f"{flag}={getattr(self, flag)} ({what} are not implemented)")
        if self.pre_seq_len is not None:
            problems.append(f"pre_seq_len={self.pre_seq_len} (P-tuning prefixes are not implemented)")
        if self.kv_channels % 4:
            problems.append(f"kv_channels {self.kv_channels}: RoPE rotates pairs in the first half of each head")
        if self.num_attention_heads % self.num_kv_heads:
            problems.append(f"{self.num_attention_heads} heads cannot share {self.num_kv_heads} KV groups evenly")
        if self.boi_token_id is None or self.eoi_token_id is None:
            problems.append("boi_token_id / eoi_token_id are missing (the image's begin / end token ids)")
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
        if v.image_size % v.patch_size or v.grid % 2:
            problems.append(f"vision image_size {v.image_size} / patch_size {v.patch_size} must give an even grid "
                            "(the 2x2 stride-2 conv)")
        if v.num_positions != v.grid ** 2 + 1:
            problems.append(f"vision num_positions {v.num_positions} != {v.grid}^2 + 1 (the table is added whole, "
                            "class token first, without interpolation)")
        if v.hidden_act != "gelu":
            problems.append(f"vision hidden_act {v.hidden_act!r} (only the exact 'gelu' is implemented)")
        if problems:
            raise ValueError(f"{where}: unsupported GLM-4V config: " + "; ".join(problems))
