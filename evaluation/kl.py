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


def teacher_forced_inputs(adapter, loaded, evals: dict[str, list[dict]], n: int | None,
                          end_text: str = "<|im_end|>") -> list[dict]:
    """The first ``n`` rows of every subset as model inputs with the first reference answer appended."""
    tok = loaded.processor.tokenizer
    out = []
    for subset, rows in evals.items():
        for r in rows[:n]:
            inp = adapter.build_inputs(loaded, Sample([image_of(r)], adapter.prompt(subset, r)), "cpu")
            ans = tok(parse_answers(r["answer"])[0] + end_text, add_special_tokens=False,
                      return_tensors="pt")["input_ids"]
            inp["input_ids"] = torch.cat([inp["input_ids"], ans], 1)
            inp["attention_mask"] = torch.ones_like(inp["input_ids"])
            out.append(inp)
    return out


@torch.no_grad()
def text_logprobs(adapter, loaded, batches: list[dict]) -> list[torch.Tensor]:
    """Log-probabilities of the next token at every text position after the last visual token."""
    out = []
    for b in batches:
        logits = loaded.model(**b, use_cache=False).logits[0].float()
        visual = adapter.visual_token_mask(loaded, b)[0]
        after = torch.arange(len(visual)) > int(visual.nonzero().max())
        out.append(torch.log_softmax(logits[after], -1))
    return out


def mean_kl(ref: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """``KL(ref || other)`` in nats per position, averaged over all positions of all prompts."""
    if len(ref) != len(other) or any(p.shape != q.shape for p, q in zip(ref, other)):
        raise ValueError("the two models were scored on different prompts")
    return sum(float((p.exp() * (p - q)).sum()) for p, q in zip(ref, other)) / sum(len(p) for p in ref)
