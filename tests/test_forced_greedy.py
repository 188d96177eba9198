"""Greedy answers read off a teacher-forced forward (evaluation.kl.forced_greedy) equal transformers' greedy
``generate``: on a tiny LLaVA in FP32 and quantized (static W8A8 with MSQ, AIFS and the sink scale set), whether
the reference answer agrees with the greedy one fully, in part, or not at all."""
import copy

import pytest
import torch

from evaluation.kl import after_visual, forced_greedy, positions_after_visual, text_logprobs
from exam.common import build_parser, config_from_args
from fake_quant import pipeline
from model import registry, tiny
from model.base import Loaded
from tests.helpers import batches

NEW = 6


@pytest.fixture(scope="module")
def models():
    ad = registry.get("llava")
    # large initial weights: the greedy tokens depend on the context (at the default scale every answer is one
    # token repeated, which a wrong cache would not change)
    fp = Loaded(tiny.llava_model(seed=0, text={"initializer_range": 0.3}), tiny.TinyLlavaProcessor(), "tiny")
    flags = ["--model_path", "tiny", "--rotate", "--rotate_visual_clip", "--rotate_llm", "--online_visual_hadamard",
             "--online_llm_hadamard", "--quant", "--quant_visual_clip", "--quant_llm", "--visual_static",
             "--llm_static", "--visual_w_bits", "8", "--llm_w_bits", "8", "--aifs", "--visual_split", "--llm_split",
             "--sink_scale", "--visual_w_rtn", "--llm_w_rtn"]
    q = Loaded(copy.deepcopy(fp.model), fp.processor, "tiny")
    calib = batches(ad, fp, n=4, seed=5)
    pipeline.run(config_from_args(build_parser("llava").parse_args(flags)), ad, q, calib, calib)
    assert q.modality_state is not None and q.modality_state.sink
    return ad, {"fp32": fp, "w8a8 msq+aifs+sink": q}


def generated(model, prompt, eos):
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, prompt["input_ids"].shape[1]:].tolist()


def forced(prompt, answer):
    ids = torch.cat([prompt["input_ids"], torch.tensor([answer], dtype=torch.long)], 1)
    return {**prompt, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("which", ["fp32", "w8a8 msq+aifs+sink"])
def test_forced_greedy_equals_generate(models, which):
    ad, ms = models
    loaded = ms[which]
    seen = set()
    for prompt in batches(ad, loaded, n=3, seed=11):
        greedy = generated(loaded.model, prompt, eos=299)  # a token the tiny model never picks: runs to NEW
        assert len(greedy) == NEW and len(set(greedy)) > 3
        other = [(t + 1) % 300 for t in greedy]
        refs = {
            "the greedy answer": greedy,
            "agrees on 2 tokens": greedy[:2] + other[2:4],
            "agrees on none": other[:3],
            "shorter than the answer": greedy[:1],
            "longer than NEW": greedy + other[:3],
        }
        plen = prompt["input_ids"].shape[1]
        for why, ref in refs.items():
            new, logits = forced_greedy(loaded.model, forced(prompt, ref), plen, NEW, {299})
            assert new == greedy, why
            seen.add(why)
        # stopping at an end token the model does emit (its third greedy token)
        stop = greedy[2]
        want = generated(loaded.model, prompt, eos=stop)
        for ref in (greedy, greedy[:1], other):
            assert forced_greedy(loaded.model, forced(prompt, ref), plen, NEW, {stop})[0] == want
    assert len(seen) == 5


def test_forced_logits_are_the_teacher_forced_forward(models):
    """The KL log-probabilities read from the forward that answers equal a forward of their own; the head runs on
    the positions asked for, and too few positions are refused."""
    ad, ms = models
    loaded = ms["w8a8 msq+aifs+sink"]
    prompt = batches(ad, loaded, n=1, seed=3)[0]
    f = forced(prompt, [5, 6, 7])
    plen, n = prompt["input_ids"].shape[1], positions_after_visual(ad, loaded, f)
    ref = text_logprobs(ad, loaded, [f])[0]
    assert ref.shape[0] == n >= 4
    new, logits = forced_greedy(loaded.model, f, plen, NEW, {299}, keep=n)
    assert logits.shape[0] == n
    assert torch.allclose(after_visual(ad, loaded, f, logits), ref, atol=1e-5, rtol=0)
    new_all, full = forced_greedy(loaded.model, f, plen, NEW, {299}, keep=f["input_ids"].shape[1])
    assert new_all == new and full.shape[0] == f["input_ids"].shape[1]
    assert torch.allclose(after_visual(ad, loaded, f, full), ref, atol=1e-5, rtol=0)
    short = forced_greedy(loaded.model, f, plen, NEW, {299})[1]
    assert short.shape[0] == 4  # the answer's 3 tokens and the position after the prompt
    with pytest.raises(ValueError, match="follow the last visual token"):
        after_visual(ad, loaded, f, short)
