"""InternViT (InternVL2's vision encoder), written from the architecture of the released checkpoints.

Parameter names match the original ``vision_model.*`` keys: ``embeddings.{class_embedding,
patch_embedding, position_embedding}`` and ``encoder.layers.N.{norm1, attn.qkv, attn.proj, ls1, norm2,
mlp.fc1, mlp.fc2, ls2}`` (plus ``attn.q_norm`` / ``attn.k_norm`` with qk normalization). Pre-norm
blocks with LayerScale: ``x + ls1 * attn(norm1(x))``, ``x + ls2 * mlp(norm2(x))``; no final norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from ..layers import CastBackRMSNorm as InternRMSNorm


def make_norm(cfg: VisionConfig, width: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return InternRMSNorm(width, cfg.layer_norm_eps)
    return nn.LayerNorm(width, eps=cfg.layer_norm_eps)


def _act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"vision_config.hidden_act {name!r} is not supported (gelu, gelu_pytorch_tanh)")


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.grid = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, d))

    def _positions(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """The class token's row, then the patch table resized (bicubic) from its trained grid to ``h x w``."""
        table = self.position_embedding
        patch = table[:, 1:]
        if (h, w) != (self.grid, self.grid):
            grid = patch.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            patch = grid.reshape(1, -1, h * w).permute(0, 2, 1)
        return torch.cat([table[:, :1], patch.to(table.dtype)], dim=1).to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))          # [N, D, h, w]
        n, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(n, 1, d)
        return torch.cat([cls, x], dim=1) + self._positions(h, w, x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = InternRMSNorm(d, cfg.layer_norm_eps)
            self.k_norm = InternRMSNorm(d, cfg.layer_norm_eps)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        if self.qk_normalization:  # over all heads together, before the split into heads
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _act(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1, self.norm2 = make_norm(cfg, d), make_norm(cfg, d)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(d))
        self.ls2 = nn.Parameter(torch.ones(d))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    """Returns the residual stream after the last kept layer, class token first: ``[tiles, 1 + h*w, D]``.

    ``num_layers`` < ``cfg.num_hidden_layers`` keeps only the layers a ``select_layer`` other than -1
    reads (the checkpoint's later layers are then not loaded)."""

    def __init__(self, cfg: VisionConfig, num_layers: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, cfg.num_hidden_layers if num_layers is None else num_layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(pixel_values))
