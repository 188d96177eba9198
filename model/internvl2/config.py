"""InternVL2's config.json, read into plain dataclasses (no remote code).

The checkpoint folder's config.json has ``architectures: ["InternVLChatModel"]``, the chat settings at
the top level (pixel shuffle ratio, tile size and count, chat template name), a ``vision_config`` for
InternViT and an ``llm_config`` for the language model: InternLM2 for InternVL2-2B / 8B / 26B, Qwen2
for InternVL2-1B (InternVL2-4B's Phi-3 is not supported). Field names are the original ones.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

LLM_ARCHS = {"InternLM2ForCausalLM": "internlm2", "Qwen2ForCausalLM": "qwen2"}


def _pick(cls, d: dict, **defaults):
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in {**defaults, **d}.items() if k in names}
    return cls(**kw)


@dataclass
class VisionConfig:
    """Fields of ``vision_config``; a field the file leaves out takes the original config class's default
    (those describe InternViT-6B; InternViT-300M checkpoints spell every field out)."""

    hidden_size: int = 3200
    intermediate_size: int = 12800
    num_attention_heads: int = 25
    num_hidden_layers: int = 48
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"     # or "layer_norm" (InternViT-300M)
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class InternLM2Config:
    """Fields of an InternLM2 ``llm_config``, with the original config class's defaults for absent ones."""

    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None   # None: one KV head per attention head
    num_hidden_layers: int = 32
    vocab_size: int = 103168
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class InternVLConfig:
    vision: VisionConfig
    llm_kind: str                          # "internlm2" or "qwen2"
    llm: dict                              # llm_config as written in config.json
    # defaults of the original InternVLChatConfig (InternVL2 checkpoints set all of these)
    downsample_ratio: float = 0.5
    ps_version: str = "v1"
    select_layer: int = -1
    force_image_size: int | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    template: str | None = None

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def num_image_token(self) -> int:
        """Tokens per 448-px tile after the pixel shuffle (256 for InternVL2)."""
        side = self.image_size // self.vision.patch_size
        return int(side * side * self.downsample_ratio ** 2)

    @property
    def shuffle_factor(self) -> int:
        """How many ViT tokens one LLM token concatenates (4 at downsample ratio 0.5)."""
        return round(1 / self.downsample_ratio ** 2)

    def internlm2(self) -> InternLM2Config:
        return _pick(InternLM2Config, self.llm)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "InternVLConfig":
        for key in ("vision_config", "llm_config"):
            if not isinstance(d.get(key), dict):
                raise ValueError(f"{where}: an InternVL2 config needs a {key!r} section")
        llm = dict(d["llm_config"])
        archs = llm.get("architectures") or []
        kinds = [LLM_ARCHS[a] for a in archs if a in LLM_ARCHS]
        if not kinds:
            raise ValueError(f"{where}: llm_config.architectures {archs} is not supported; "
                             f"InternVL2 checkpoints with {', '.join(LLM_ARCHS)} are")
        vision = _pick(VisionConfig, d["vision_config"])
        if vision.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"{where}: vision_config.norm_type {vision.norm_type!r} is not 'layer_norm' or 'rms_norm'")
        cfg = _pick(cls, d, vision=vision, llm_kind=kinds[0], llm=llm)
        if cfg.ps_version not in ("v1", "v2"):
            raise ValueError(f"{where}: ps_version {cfg.ps_version!r} is not 'v1' or 'v2'")
        side = cfg.image_size // vision.patch_size
        if cfg.image_size % vision.patch_size or (side * cfg.downsample_ratio) % 1:
            raise ValueError(f"{where}: image size {cfg.image_size} with patch {vision.patch_size} and downsample ratio "
                             f"{cfg.downsample_ratio} does not give a whole token grid")
        return cfg

