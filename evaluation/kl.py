"""Teacher-forced next-token KL divergence of a (quantized) model from a reference model.

Scores flip on a handful of unsure answers; the KL divergence ``KL(reference || model)`` of the next-token
distributions moves smoothly with the quantization error, so it is the primary signal of a quality table.
Every prompt is image + question + the reference answer (teacher forcing), and the KL is averaged over the text
positions after the last visual token, in nats per token.
"""
from __future__ import annotations

import torch

from model.base import Sample

from .datasets import image_of
from .scorers import parse_answers


END_TEXT = "<|im_end|>"


def with_reference(loaded, inputs: dict, row: dict, end_text: str = END_TEXT) -> dict:
    """``inputs`` (a prompt) with the row's first reference answer and ``end_text`` appended."""
    ans = loaded.processor.tokenizer(parse_answers(row["answer"])[0] + end_text, add_special_tokens=False,
                                     return_tensors="pt")["input_ids"].to(inputs["input_ids"].device)
    ids = torch.cat([inputs["input_ids"], ans], 1)
    return {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def teacher_forced_inputs(adapter, loaded, evals: dict[str, list[dict]], n: int | None,
                          end_text: str = END_TEXT) -> list[dict]:
    """The first ``n`` rows of every subset as model inputs with the first reference answer appended."""
    return [with_reference(loaded, adapter.build_inputs(loaded, Sample([image_of(r)], adapter.prompt(subset, r)),
                                                        "cpu"), r, end_text)
            for subset, rows in evals.items() for r in rows[:n]]


def positions_after_visual(adapter, loaded, batch: dict) -> int:
    """How many positions of ``batch`` (one sequence) follow its last visual token."""
    visual = adapter.visual_token_mask(loaded, batch)[0]
    return len(visual) - 1 - int(visual.nonzero().max())


def after_visual(adapter, loaded, batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token at every text position after the last visual token of ``batch``
    (one sequence). ``logits`` ``[positions, vocab]`` are those of the last positions of the sequence (all of them,
    or at least the ones after the last visual token)."""
    n = positions_after_visual(adapter, loaded, batch)
    if logits.shape[0] < n:
        raise ValueError(f"logits of the last {logits.shape[0]} positions, {n} follow the last visual token")
    return torch.log_softmax(logits[logits.shape[0] - n:].float(), -1)


@torch.no_grad()
def text_logprobs(adapter, loaded, batches: list[dict]) -> list[torch.Tensor]:
    """Log-probabilities of the next token at every text position after the last visual token."""
    return [after_visual(adapter, loaded, b, loaded.model(**b, use_cache=False).logits[0]) for b in batches]


@torch.no_grad()
def forced_greedy(model, forced: dict, prompt_len: int, max_new_tokens: int, eos: set[int], keep: int = 0
                  ) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding of the prompt ``forced["input_ids"][:, :prompt_len]``, read off one teacher-forced forward.

    ``forced`` is the prompt with a reference answer appended (batch of one). The forward over all of it gives,
    causally, the next-token logits after the prompt and after every prefix of the reference answer; as long as
    the greedy token equals the reference token, the next greedy token is read from those logits. Where they first
    differ (or the reference runs out) the KV cache is cut back to the tokens agreed so far and decoding goes on
    one token at a time. The tokens are greedy ``generate``'s (up to float summation order: the prompt is
    computed in a longer forward), and a model that gives the reference answer costs one forward.

    Returns the new tokens (ending at the first of ``eos``, at most ``max_new_tokens``) and the forced forward's
    logits of its last ``max(keep, answer length + 1)`` positions (the head runs on those only)."""
    ref = forced["input_ids"][0, prompt_len:].tolist()
    keep = max(keep, len(ref) + 1)
    out = model(**forced, use_cache=True, logits_to_keep=keep)
    logits, cache = out.logits[0], out.cache
    first = keep - len(ref) - 1  # row of ``logits`` after the last prompt token
    new: list[int] = []
    for j in range(max_new_tokens):
        tok = int(logits[first + j].argmax())
        new.append(tok)
        if tok in eos or len(new) == max_new_tokens:
            break
        if j < len(ref) and tok == ref[j]:
            continue  # the forward already computed the logits after this token
        extra = cache.get_seq_length() - (prompt_len + j)
        if extra:
            cache.crop(-extra)  # keep the prompt and the agreed tokens
        ids = forced["input_ids"].new_tensor([[tok]])
        while len(new) < max_new_tokens:
            tok = int(model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1].argmax())
            new.append(tok)
            if tok in eos:
                break
            ids = ids.new_tensor([[tok]])
        break
    return new, logits


def mean_kl(ref: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """``KL(ref || other)`` in nats per position, averaged over all positions of all prompts."""
    if len(ref) != len(other) or any(p.shape != q.shape for p, q in zip(ref, other)):
        raise ValueError("the two models were scored on different prompts")
    return sum(float((p.exp() * (p - q)).sum()) for p, q in zip(ref, other)) / sum(len(p) for p in ref)
