"""MiniCPM-V 2.6's config.json (``MiniCPMV``, ``model_type`` "minicpmv"), read into dataclasses (no remote code).

The language model's fields sit at the top level (the original config class subclasses Qwen2Config); the SigLIP
tower's in ``vision_config``; the slicing settings in ``slice_config``. Where the file leaves a field out, the
original class's default applies -- except ``drop_vision_last_layer``, whose class default (True) the released
file overrides with false: a file without the field gets the class default, as the original would.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

QWEN2_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings", "vocab_size",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "max_window_layers", "use_sliding_window",
              "sliding_window", "attention_dropout", "initializer_range")


@dataclass
class VisionConfig:
    """SigLIP ``vision_config``; absent fields take the remote SiglipVisionConfig defaults."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    image_size: int = 980
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class MiniCPMVConfig:
    llm: dict                                  # the Qwen2 fields, for transformers' Qwen2Config
    vision: VisionConfig
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = True
    use_image_id: bool = True
    vision_batch_size: int = 16
    max_slice_nums: int = 1                    # from slice_config (the class uses 1 without one)
    scale_resolution: int = 448                # slice_config's, absent in the released file
    slice_mode: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def vision_layers(self) -> int:
        return self.vision.num_hidden_layers - (1 if self.drop_vision_last_layer else 0)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "MiniCPMVConfig":
        archs = d.get("architectures") or []
        if archs and "MiniCPMV" not in archs:
            raise ValueError(f"{where}: architectures {archs} is not MiniCPM-V's MiniCPMV")
        version = float(d.get("version", 2.6) or 2.6)
        if version != 2.6:
            raise ValueError(f"{where}: MiniCPM-V version {version} is not supported (2.6 is: earlier versions add a "
                             "query position embedding and a BOS token)")
        if d.get("quantization_config"):
            raise ValueError(f"{where}: this checkpoint is already quantized; give the floating-point MiniCPM-V-2_6")
        if "vision_config" not in d:
            raise ValueError(f"{where} has no vision_config: not a MiniCPM-V checkpoint")
        vnames = {f.name for f in fields(VisionConfig)}
        vision = VisionConfig(**{k: v for k, v in d["vision_config"].items() if k in vnames})
        sl = d.get("slice_config") or {}
        own = {f.name for f in fields(cls)} - {"llm", "vision", "extra", "max_slice_nums", "scale_resolution"}
        cfg = cls(llm={k: d[k] for k in QWEN2_KEYS if k in d}, vision=vision,
                  max_slice_nums=int(sl.get("max_slice_nums", 1)), scale_resolution=int(sl.get("scale_resolution", 448)),
                  **{k: v for k, v in d.items() if k in own})
        if cfg.hidden_size % 128:
            raise ValueError(f"{where}: hidden_size {cfg.hidden_size} is not a multiple of the resampler's 128-wide heads")
        if (cfg.vision.hidden_act or "").replace("gelu_pytorch_tanh", "gelu_tanh") not in ("gelu_tanh",):
            raise ValueError(f"{where}: vision_config.hidden_act {cfg.vision.hidden_act!r} is not supported "
                             "(gelu_pytorch_tanh)")
        return cfg
