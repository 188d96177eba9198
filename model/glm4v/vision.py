"""GLM-4V's vision side: the EVA2-CLIP-E tower, the 2x2 stride-2 conv, the GLU adapter and the begin / end-of-image
vectors. Parameter names are the original ``transformer.vision.*`` keys, so loading needs no mapping.

The blocks are *not* pre-norm: each norm sits on a branch output, ``h = x + LN(attn(x)); out = h + LN(mlp(h))``,
and the stream itself is never normalized (no pre-norm, no final norm). Both norms are LayerNorms with eps 1e-6;
the MLP uses the exact (erf) GELU. ``query_key_value`` rows are blocked: [Q all heads | K | V], heads contiguous.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ChatGLMConfig, VisionConfig


class PatchEmbedding(nn.Module):
    """Patch conv (with bias), class token first, then the whole position table added (no interpolation)."""

    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(v.in_channels, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, v.hidden_size))
        self.position_embedding = nn.Embedding(v.num_positions, v.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)              # row-major patches
        x = torch.cat([self.cls_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"{x.shape[1]} tokens for a position table of {self.position_embedding.num_embeddings}: "
                             "GLM-4V takes images of exactly its config's image_size")
        return x + self.position_embedding.weight[None]


class Attention(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.num_heads = v.num_heads
        self.query_key_value = nn.Linear(v.hidden_size, 3 * v.hidden_size)
        self.dense = nn.Linear(v.hidden_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.query_key_value(x).reshape(b, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.attention = Attention(v)
        self.mlp = MLP(v)
        self.post_attention_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **unused) -> torch.Tensor:
        h = hidden_states + self.input_layernorm(self.attention(hidden_states))
        return h + self.post_attention_layernorm(self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, v: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(v) for _ in range(v.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """The adapter: ``linear_proj`` -> LayerNorm (eps 1e-5) -> exact GELU -> silu(gate) * up -> down."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        self.act1 = nn.GELU()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """``[n, 3, S, S]`` pixels -> ``[n, 1 + image_tokens + 1, hidden]``: boi, the image's features, eoi, all divided
    by ``scaling_factor``; they replace the prompt's three image ids."""

    def __init__(self, cfg: ChatGLMConfig) -> None:
        super().__init__()
        v = cfg.vision
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = Transformer(v)
        self.conv = nn.Conv2d(v.hidden_size, cfg.hidden_size, kernel_size=2, stride=2)
        self.linear_proj = GLU(cfg.hidden_size, cfg.ffn_hidden_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.scaling_factor = v.scaling_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images.to(self.boi.dtype)))[:, 1:]   # the class token goes
        b, s, c = x.shape
        g = int(round(s ** 0.5))
        x = self.conv(x.reshape(b, g, g, c).permute(0, 3, 1, 2))     # 2x2 neighbours, row-major grid kept
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        x = torch.cat([self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)], dim=1)
        return x / self.scaling_factor
