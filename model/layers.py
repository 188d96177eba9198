"""Pieces shared by the decoders this project implements itself (InternLM2, QWen): the cast-back RMSNorm,
RoPE on halves, the 4-D attention mask and greedy decoding with a KV cache."""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


class CastBackRMSNorm(nn.Module):
    """RMSNorm whose statistics run in float32 and whose result is cast back to the input dtype *before* the
    scale is applied, as in the original InternLM2 / InternViT-6B / QWen checkpoints' code; with
    ``cast_before_scale=False`` the scale is applied in float32 and the product cast back (GLM-4's code)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, cast_before_scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.cast_before_scale = cast_before_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if not self.cast_before_scale:
            return (self.weight * xf).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: [b, heads, s, d]; cos / sin: [b, s, d]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def rope_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[b, s, dim]`` for NeoX-style RoPE, angles in float32 as the original tables."""
    freqs = position_ids.float()[..., None] * inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_mask_4d(mask: torch.Tensor | None, batch: int, q_len: int, past: int, device) -> torch.Tensor:
    """Bool ``[b, 1, q, past + q]`` (True = may attend) from a 2-D padding mask over all keys (1 = real
    token) or None: causal, padding keys hidden. Every query may attend its own key, so the rows of
    padding tokens stay finite. A 4-D bool mask (AIFS's permuted causal mask) is returned as given."""
    if mask is not None and mask.dim() == 4:
        if mask.dtype != torch.bool:
            raise ValueError("a 4-D attention_mask must be bool (True = may attend)")
        return mask
    total = past + q_len
    qpos = torch.arange(past, total, device=device)[:, None]
    kpos = torch.arange(total, device=device)[None, :]
    allowed = (kpos <= qpos)[None, None].expand(batch, 1, q_len, total)
    if mask is not None:
        if mask.shape != (batch, total):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {(batch, total)} "
                             "(batch, cached + new tokens)")
        allowed = allowed & mask.bool()[:, None, None, :]
    return allowed | (kpos == qpos)[None, None]


def attention_mask_or_causal(mask: torch.Tensor | None, batch: int, q_len: int, past: int,
                             device) -> torch.Tensor | None:
    """:func:`attention_mask_4d`, or None where no key is padding and the plain causal rule holds with SDPA's
    ``is_causal`` (no cache, or one new token): torch's CPU kernels compute the full square for any explicit mask
    but skip the upper triangle with ``is_causal``. Callers pass ``is_causal=mask is None and q_len > 1``."""
    no_padding = mask is None or (mask.shape == (batch, past + q_len) and bool(mask.all()))
    if no_padding and (past == 0 or q_len == 1):
        return None
    return attention_mask_4d(mask, batch, q_len, past, device)  # also rejects a mask of the wrong shape


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, eos: tuple[int, ...], attention_mask=None,
                    max_new_tokens: int = 32, pad_token_id: int | None = None, **prefill) -> torch.Tensor:
    """Greedy decoding with a KV cache through ``model(input_ids=..., attention_mask=..., position_ids=...,
    past_key_values=..., use_cache=True, **prefill)`` (``prefill``: e.g. ``pixel_values``, given to the
    first step only). Returns the prompt followed by the new tokens, like transformers' ``generate``;
    rows of a batch that finished are padded with ``pad_token_id`` (default: the first stop id)."""
    from transformers import DynamicCache

    stop = torch.tensor(list(eos), device=input_ids.device)
    pad = int(pad_token_id if pad_token_id is not None else stop[0])
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                **prefill)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids


@functools.lru_cache(maxsize=None)
def cache_kwarg(decoder_class: type) -> str:
    """A transformers decoder's name for the KV cache (transformers 5.24 renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


@torch.no_grad()
def beam_generate(model: nn.Module, input_ids: torch.Tensor, eos: tuple[int, ...], num_beams: int,
                  attention_mask=None, max_new_tokens: int = 32, repetition_penalty: float = 1.0,
                  pad_token_id: int | None = None, length_penalty: float = 1.0, **prefill) -> torch.Tensor:
    """Beam search for one prompt with a KV cache, as transformers' ``generate(num_beams=..., do_sample=False)``
    runs it from ``inputs_embeds`` (the way MiniCPM-V's ``chat`` calls it): the repetition penalty sees only the
    generated tokens and acts on log-probabilities; a hypothesis ends at a stop id or at ``max_new_tokens``, scored
    by its summed log-probability over its length ** ``length_penalty``; the search stops once ``num_beams``
    hypotheses are done and no running beam can beat the worst of them. The model is called as in
    :func:`greedy_generate` (one prefill, then one token per beam), so forward hooks see every step.
    Returns the prompt followed by the best hypothesis."""
    from transformers import DynamicCache

    if input_ids.shape[0] != 1:
        raise ValueError(f"beam search decodes one prompt at a time, got a batch of {input_ids.shape[0]}")
    dev = input_ids.device
    stop = torch.tensor(list(eos), device=dev)
    pad = int(pad_token_id if pad_token_id is not None else stop[0])
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                **prefill)
    cache.batch_repeat_interleave(num_beams)
    mask, pos = mask.expand(num_beams, -1), pos[:, -1:].expand(num_beams, -1)
    logits = out.logits[:, -1].float().expand(num_beams, -1)
    keep = max(2, 1 + len(eos)) * num_beams          # candidates per step: enough to refill every beam
    running = torch.zeros(num_beams, 0, dtype=torch.long, device=dev)
    scores = torch.full((num_beams,), -1e9, device=dev)
    scores[0] = 0.0                                    # every beam starts as the same prompt: count it once
    done_seqs = torch.full((num_beams, max_new_tokens), pad, dtype=torch.long, device=dev)
    done_len = torch.zeros(num_beams, dtype=torch.long, device=dev)
    done_scores = torch.full((num_beams,), -1e9, device=dev)
    done = torch.zeros(num_beams, dtype=torch.bool, device=dev)
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits, dim=-1)
        if repetition_penalty != 1.0 and running.shape[1]:
            seen = logp.gather(1, running)
            logp = logp.scatter(1, running, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
        vocab = logp.shape[-1]
        top, idx = torch.topk((logp + scores[:, None]).reshape(-1), keep)
        beam, token = idx // vocab, idx % vocab
        cand = torch.cat([running[beam], token[:, None]], dim=1)
        hits = torch.isin(token, stop) | (step + 1 >= max_new_tokens)
        # hypotheses that just ended (only among the best num_beams candidates) compete with the finished ones
        ended = hits & (torch.arange(keep, device=dev) < num_beams)
        cand_scores = top / ((step + 1) ** length_penalty) + (~ended).float() * -1e9
        padded = torch.nn.functional.pad(cand, (0, max_new_tokens - cand.shape[1]), value=pad)
        pick = torch.topk(torch.cat([done_scores, cand_scores]), num_beams).indices
        done_seqs = torch.cat([done_seqs, padded])[pick]
        done_len = torch.cat([done_len, torch.full((keep,), step + 1, device=dev)])[pick]
        done_scores = torch.cat([done_scores, cand_scores])[pick]
        done = torch.cat([done, ended])[pick]
        # the best num_beams candidates that did not end keep running
        run_scores = top + hits.float() * -1e9
        nxt = torch.topk(run_scores, num_beams).indices
        running, scores, src = cand[nxt], run_scores[nxt], beam[nxt]
        best_running = scores[0] / ((step + 1) ** length_penalty)
        can_improve = not bool(done.all()) or bool(best_running > done_scores.min())
        if not can_improve or bool(hits.all()) or step == max_new_tokens - 1:
            break
        cache.reorder_cache(src)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        logits = model(input_ids=running[:, -1:], attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
    best = int(torch.argmax(done_scores))
    return torch.cat([input_ids, done_seqs[best, :int(done_len[best])][None]], dim=1)
