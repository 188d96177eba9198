"""Model-agnostic description of residual-stream transformers, filled in by the model adapters.

A *stack* is one residual stream (a vision encoder, or the language model): what writes into it
before the first block (embeddings, patch embedding, class token, position table, a connector's
output layer), its blocks, its final norm and the layers that read that norm's output.
Everything is a dotted module / parameter path from the model root, so the rotation and
quantization code never needs to know which model family it is working on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Writer:
    """Something that adds into the residual stream. ``kind``: ``linear`` (an nn.Linear output),
    ``embedding`` (an nn.Embedding table), ``conv`` (a patch-embedding convolution's output
    channels), ``param`` (a tensor whose last dimension is the stream: class token, position table)
    or ``norm`` (a LayerNorm whose output *starts* the stream, like CLIP's ``ln_pre``: its affine part
    cannot absorb a rotation, so it becomes a weightless LayerNorm followed by a linear ``diag(gamma), beta``
    that writes the stream, at ``<path>.1``)."""

    path: str
    kind: str = "linear"


@dataclass(frozen=True)
class Reader:
    """An nn.Linear that reads the (normalized) stream. ``chunks > 1``: its input is ``chunks``
    stream vectors concatenated (a patch merger reading 2x2 neighbouring tokens)."""

    path: str
    chunks: int = 1


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    o: str                                 # output projection (relative to the block)
    q: str | None = None                   # separate projections ...
    k: str | None = None
    v: str | None = None
    qkv: str | None = None                 # ... or one packed projection, its rows laid out as
    # "blocked": [all q heads; all k heads; all v heads] (ViTs, Qwen), or
    # "grouped": per KV head, [its G = num_heads / num_kv_heads q heads; k; v] (InternLM2's wqkv), or
    # "interleaved": per head, [q_h; k_h; v_h] (the ViT of Qwen-VL; no GQA)
    qkv_layout: str = "blocked"

    def __post_init__(self) -> None:
        separate = self.q and self.k and self.v
        if bool(separate) == bool(self.qkv):
            raise ValueError("AttentionSpec needs either q, k and v, or qkv")
        if self.qkv_layout not in ("blocked", "grouped", "interleaved"):
            raise ValueError(f"qkv_layout must be 'blocked', 'grouped' or 'interleaved', got {self.qkv_layout!r}")
        if self.qkv_layout == "interleaved" and self.num_kv_heads != self.num_heads:
            raise ValueError("an interleaved qkv layout has one k and v per head (num_kv_heads == num_heads)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads cannot share {self.num_kv_heads} KV heads evenly")

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)

    def v_rows(self) -> tuple[str, torch.Tensor]:
        """(path of the layer producing V, the rows of V in its weight as a long ``[num_kv_heads, head_dim]``)."""
        hd, kv = self.head_dim, self.num_kv_heads
        if not self.qkv:
            return self.v, torch.arange(kv * hd).reshape(kv, hd)
        if self.qkv_layout == "blocked":
            return self.qkv, (self.num_heads + kv) * hd + torch.arange(kv * hd).reshape(kv, hd)
        if self.qkv_layout == "interleaved":
            return self.qkv, (torch.arange(kv) * 3 + 2)[:, None] * hd + torch.arange(hd)[None, :]
        per_group = self.num_heads // kv + 2  # q heads of the group, then its k, then its v
        starts = (torch.arange(kv) * per_group + per_group - 1) * hd
        return self.qkv, starts[:, None] + torch.arange(hd)[None, :]


@dataclass(frozen=True)
class AttentionSite:
    """An attention layer outside the residual stacks, at ``path`` -- a connector's cross-attention (Qwen-VL's
    resampler): it gets the per-head V/O Hadamard with ``--rotate_visual_cross_attn``."""

    path: str
    attn: AttentionSpec


@dataclass(frozen=True)
class BlockSpec:
    """Paths inside one pre-norm block."""

    attn_norm: str
    attn: AttentionSpec
    mlp_norm: str
    mlp_in: tuple[str, ...]                # gate/up or fc1
    mlp_out: str                           # down / fc2
    attn_scale: str | None = None          # LayerScale applied to the attention output
    mlp_scale: str | None = None           # LayerScale applied to the MLP output


@dataclass(frozen=True)
class StackSpec:
    name: str                              # "visual" or "llm"
    hidden_size: int
    blocks: str                            # path of the nn.ModuleList of blocks
    block: BlockSpec
    norm_kind: str                         # "layernorm" or "rmsnorm"
    writers: tuple[Writer, ...]            # writers before the first block
    final_norm: str | None
    readers: tuple[Reader, ...]            # readers of the final norm's output
    tied: tuple[str, str] | None = None    # (embedding path, head path) sharing one weight
    # LayerNorm stacks whose raw residual stream is read by something other than a norm (LLaVA's
    # projector reads a hidden state): keep the stream's mean and let each converted norm remove the
    # mean direction itself, instead of baking the mean out of every writer
    keep_mean: bool = False
    # the block's norms sit on the branch *outputs* (h = x + norm(attn(x)); out = h + norm(mlp(h)), GLM-4V's
    # EVA2-CLIP) instead of their inputs: no linear reads a norm's output, so nothing can absorb a norm's
    # scale or a residual rotation offline. Such a stack keeps its norms; rotating it applies only what stays
    # exact there (per-head V/O, online Hadamards on linear inputs)
    branch_output_norms: bool = False

    def __post_init__(self) -> None:
        if self.norm_kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm_kind must be 'layernorm' or 'rmsnorm', got {self.norm_kind!r}")

    @property
    def residual_rotation(self) -> bool:
        """Whether the residual stream can be rotated offline (its norms can be fused into their readers)."""
        return not self.branch_output_norms

    @property
    def root(self) -> str:
        """The module holding the blocks (the language model itself, for the LLM stack)."""
        return self.blocks.rpartition(".")[0]

    def block_paths(self, model: nn.Module) -> list[str]:
        return [f"{self.blocks}.{i}" for i in range(len(get(model, self.blocks)))]


def get(root: nn.Module, path: str):
    """Module or parameter at a dotted path (``""`` is the root)."""
    obj = root
    for part in filter(None, path.split(".")):
        obj = obj[int(part)] if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)) else getattr(obj, part)
    return obj


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    owner = get(root, parent)
    if name.isdigit() and isinstance(owner, (nn.ModuleList, nn.Sequential)):
        owner[int(name)] = new
    else:
        setattr(owner, name, new)


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def first_existing(root: nn.Module, candidates: tuple[str, ...]) -> str:
    """The first dotted path that exists in ``root`` (module layouts differ between library versions)."""
    for c in candidates:
        try:
            get(root, c)
            return c
        except (AttributeError, IndexError):
            continue
    raise ValueError(f"none of the module paths {candidates} exists in {type(root).__name__}")


def scale_param(root: nn.Module, path: str) -> nn.Parameter:
    """A LayerScale vector: a parameter at ``path``, or the single parameter of the module there."""
    obj = get(root, path)
    if isinstance(obj, torch.Tensor):
        return obj
    params = list(obj.parameters(recurse=False))
    if len(params) != 1:
        raise ValueError(f"{path}: expected a LayerScale with one parameter, found {len(params)}")
    return params[0]
