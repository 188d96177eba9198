"""Causal prefill attention on a CPU in bf16, as plain GEMMs over blocks of queries.

torch's CPU kernel for ``F.scaled_dot_product_attention(..., is_causal=True)`` runs at the same speed in bf16 as
in float32 (on an AVX-512 BF16 machine: ~290 ms per Qwen2-VL-2B layer at 4146 tokens, about 180 GFLOP/s), while
bf16 GEMMs there reach ~900 GFLOP/s. At long prompts the attention core is then half of a bf16 prefill and hides
whatever the linear layers gain (see ``docs/realquant.md``). :func:`blocked_causal` computes the same attention
from the GEMMs: for each block of ``block`` queries, the scores against the keys up to the block's end (``bmm``
in the input dtype, all query heads of a key/value head in one call), the causal mask on the diagonal block
only, ``softmax`` (float32 inside torch's kernel, rounded to the input dtype), times the values. The blocks
above the diagonal are never computed, and each block's scores stay in cache.

Its arithmetic is that of transformers' ``eager`` attention in bf16 (scores rounded to bf16, softmax in float32,
probabilities rounded to bf16), with the scale applied to the queries first (one bf16 rounding of ``q * scale``).
``tests/test_prefill_attention.py`` bounds it against a float64 reference and against transformers' eager
attention.

It is off unless asked for (:func:`use` / :func:`set_mode`): ``"blocked"`` routes every causal prefill without
a mask (the plain causal case and AIFS's original-order prefill, see :mod:`fake_quant.aifs`) through it when it
applies -- a CPU, bf16, queries and keys of the same length (no cache), at least ``MIN_TOKENS`` of them -- and
to SDPA otherwise. In float32 it is no faster than SDPA on the machines measured, so it is not used there.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

MODES = ("sdpa", "blocked")
BLOCK_ROWS = 768   # query rows per GEMM (query heads of one key/value head x queries): 128 queries at Qwen2-VL-2B's
                   # 6 heads per group, 109 at 7B's 7 (measured best of 64-256 at 4k tokens on an AVX-512 BF16 CPU)
MIN_TOKENS = 256   # shorter prompts: SDPA (a handful of blocks gains nothing)
DTYPES = (torch.bfloat16,)

_mode = "sdpa"


def set_mode(mode: str) -> None:
    """``"sdpa"`` (torch's kernel everywhere) or ``"blocked"`` (:func:`blocked_causal` where it applies)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"prefill attention {mode!r}: choose one of {', '.join(MODES)}")
    _mode = mode


def mode() -> str:
    return _mode


@contextmanager
def use(mode_: str):
    """``with use("blocked"): ...`` -- the mode for the block, restored after it."""
    old = _mode
    set_mode(mode_)
    try:
        yield
    finally:
        set_mode(old)


def applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a causal attention of ``q`` over ``k`` (``[batch, heads, seq, dim]``) takes :func:`blocked_causal`."""
    return (_mode == "blocked" and q.device.type == "cpu" and q.dtype in DTYPES and q.dim() == 4
            and q.shape[2] == k.shape[2] and q.shape[2] >= MIN_TOKENS and q.shape[1] % k.shape[1] == 0)


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
           enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)``, through
    :func:`blocked_causal` where :func:`applies` says so."""
    if applies(q, k) and (enable_gqa or q.shape[1] == k.shape[1]):
        return blocked_causal(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)


def blocked_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   block: int | None = None) -> torch.Tensor:
    """Causal attention of ``q [batch, heads, seq, dim]`` over ``k, v [batch, kv_heads, seq, dim]`` (``heads`` a
    multiple of ``kv_heads``: grouped queries share their key/value head), block by block of queries (module
    docstring), ``block`` queries at a time (default: ``BLOCK_ROWS`` rows per GEMM). Returns
    ``[batch, heads, seq, dim]`` in ``q``'s dtype."""
    b, heads, n, d = q.shape
    kv = k.shape[1]
    if k.shape != (b, kv, n, d) or v.shape[:3] != (b, kv, n) or heads % kv:
        raise ValueError(f"blocked causal attention needs q [b, h, n, d] and k, v [b, kv, n, *] with kv dividing h; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    g = heads // kv
    block = max(1, BLOCK_ROWS // g) if block is None else block
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    dv = v.shape[3]
    scale = d ** -0.5 if scale is None else scale
    # the scale once on the queries (one rounding), grouped: [b, kv, g * n rows of one key/value head]
    qs = (q * scale).contiguous().view(b, kv, g, n, d)
    k, v = k.contiguous(), v.contiguous()
    out = torch.empty(b, kv, g, n, dv, dtype=q.dtype, device=q.device)
    above = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(1)  # the diagonal block's future keys
    for i in range(b):
        for s in range(0, n, block):
            e = min(n, s + block)
            m = e - s
            rows = qs[i, :, :, s:e].reshape(kv, g * m, d)
            scores = torch.bmm(rows, k[i, :, :e].transpose(1, 2)).view(kv, g, m, e)
            scores[..., s:e].masked_fill_(above[:m, :m], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            out[i, :, :, s:e] = torch.bmm(p.view(kv, g * m, e), v[i, :, :e]).view(kv, g, m, dv)
    return out.view(b, heads, n, dv)
