"""AIFS: visual tokens first at prefill, and the model computes exactly what it computed before."""
import copy

import pytest
import torch

from evaluation.builtin import builtin_rows
from fake_quant import aifs, pipeline
from fake_quant.config import QuantConfig
from model import registry, tiny
from model.base import Loaded, Sample
from tests import DEVICE
from tests.helpers import count_aifs_attention

PAD = tiny.TinyQwenProcessor.PAD


@pytest.fixture(scope="module")
def pair():
    ad = registry.get("qwen2vl")
    base = ad.load("tiny", DEVICE, torch.float32)
    switched = Loaded(copy.deepcopy(base.model), base.processor, "tiny")
    cfg = QuantConfig(aifs=True)
    pipeline.rebuild(cfg, ad, switched)
    return ad, base, switched


def images(n, seed=3):
    return [r["image"] for r in builtin_rows(n, seed=seed)]


def prompt_inputs(loaded, text, imgs):
    out = loaded.processor(text=[text], images=imgs, return_tensors="pt")
    out["mm_token_type_ids"] = (out["input_ids"] == tiny.IMAGE_TOKEN).int()
    return {k: v.to(DEVICE) for k, v in out.items()}


def logits(loaded, inputs):
    with torch.no_grad():
        return loaded.model(**inputs, use_cache=False).logits


def test_permutation_and_mask():
    visual = torch.tensor([[False, True, True, False, True, False]])
    perm = aifs.permutation(visual)
    assert perm.tolist() == [[1, 2, 4, 0, 3, 5]]
    m = aifs.permuted_causal_mask(perm, None)[0, 0]
    # new 0 (orig 1) sees orig 0? no: orig 0 sits at new 3; new 3 (orig 0) sees only itself
    assert m[3].tolist() == [False, False, False, True, False, False]
    assert m[2].tolist() == [True, True, True, True, True, False]  # orig 4 sees orig 0..4


def test_one_image(pair):
    ad, base, sw = pair
    inp = ad.build_inputs(base, Sample(images(1), "What is shown?"), DEVICE)
    assert torch.allclose(logits(sw, inp), logits(base, inp), atol=1e-5, rtol=0)
    assert sw.modality_state.perm is not None and sw.modality_state.perm[0, 0] != 0  # it did reorder


def test_two_images_with_text_between_and_after(pair):
    _, base, sw = pair
    inp = prompt_inputs(base, "first " + PAD + " and then " + PAD + " which one is larger?", images(2))
    vis = inp["input_ids"] == tiny.IMAGE_TOKEN
    assert vis.sum() > 0 and not vis[0, -5:].any()
    assert torch.allclose(logits(sw, inp), logits(base, inp), atol=1e-5, rtol=0)


def _left_padded_batch(processor, prompts, imgs):
    parts = [processor(text=[p], images=[im], return_tensors="pt") for p, im in zip(prompts, imgs)]
    n = max(p["input_ids"].shape[1] for p in parts)
    ids, mask = [], []
    for p in parts:
        k = n - p["input_ids"].shape[1]
        ids.append(torch.cat([torch.zeros(1, k, dtype=torch.long), p["input_ids"]], 1))
        mask.append(torch.cat([torch.zeros(1, k, dtype=torch.long), p["attention_mask"]], 1))
    ids = torch.cat(ids)
    out = {"input_ids": ids, "attention_mask": torch.cat(mask), "mm_token_type_ids": (ids == tiny.IMAGE_TOKEN).int(),
           "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
           "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts])}
    return {k: v.to(DEVICE) for k, v in out.items()}


def test_batch_of_two_prompts_with_padding(pair):
    _, base, sw = pair
    inp = _left_padded_batch(base.processor, [PAD + " short?", "a much longer question " + PAD + " about this?"], images(2))
    assert (inp["attention_mask"] == 0).any()
    valid = inp["attention_mask"].bool()
    a, b = logits(sw, inp), logits(base, inp)
    assert torch.allclose(a[valid], b[valid], atol=1e-5, rtol=0)


def test_greedy_generation_with_kv_cache_gives_the_same_tokens(pair):
    _, base, sw = pair
    for inp in (prompt_inputs(base, PAD + " describe it", images(1)),
                _left_padded_batch(base.processor, [PAD + " hi", "tell me " + PAD + " more please"], images(2, seed=5))):
        with torch.no_grad():
            g_base = base.model.generate(**inp, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            g_sw = sw.model.generate(**inp, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(g_base, g_sw)


@pytest.mark.parametrize("sink", [False, True])
def test_msq_with_aifs_equals_msq_without(tmp_path, sink):
    from tests import main

    flags = ["--model_path", "tiny", "--rotate", "--rotate_llm", "--rotate_visual_clip", "--quant", "--quant_llm",
             "--quant_visual_clip", "--llm_static", "--visual_static", "--llm_w_rtn", "--visual_w_rtn",
             "--nsamples", "4", "--calib_num", "8"] + (["--sink_scale"] if sink else [])
    groups = 3 if sink else 2
    plain = main("qwen2vl", flags + ["--output_dir", str(tmp_path / "a")])
    switched = main("qwen2vl", flags + ["--aifs", "--output_dir", str(tmp_path / "b")])
    ad, lp, ls = plain["adapter"], plain["loaded"], switched["loaded"]
    qs_plain = [m for m in lp.model.modules() if getattr(m, "num_row_groups", 1) == groups]
    qs_sw = [m for m in ls.model.modules() if getattr(m, "num_row_groups", 1) == groups]
    assert len(qs_plain) == len(qs_sw) == 14  # 7 linears x 2 LLM layers
    for a, b in zip(qs_plain, qs_sw):  # the same calibrated scales, visual and text (and sink)
        assert torch.allclose(a.scale, b.scale, rtol=1e-5)
    # AIFS sums the same floats in another order; where a static activation sits on a rounding boundary one
    # integer code can flip, which moves a logit by ~1e-3 in this tiny model. So: most prompts give the same
    # logits to float accuracy, and none differs by more than such a flip (a broken AIFS moves every prompt).
    diffs = []
    for seed in range(9, 15):
        inp = ad.build_inputs(lp, Sample(images(1, seed=seed), "What is it?"), DEVICE)
        diffs.append(float((logits(ls, inp) - logits(lp, inp)).abs().max()))
    assert sum(d < 1e-5 for d in diffs) >= 4, diffs
    assert max(diffs) < 1e-2, diffs


# --- attention at prefill: the original order with is_causal instead of the permuted mask ----------------------

def _layouts():
    n = 23
    out = {}
    for name, runs in {"image first": [(0, 12)], "image inside": [(3, 15)], "image last": [(11, 23)],
                       "two images": [(2, 8), (12, 20)], "visual only": [(0, 23)]}.items():
        vis = torch.zeros(1, n, dtype=torch.bool)
        for a, b in runs:
            vis[0, a:b] = True
        out[name] = vis
    return out


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_in_original_order_equals_the_permuted_mask(name, kv_heads):
    """Against stock SDPA with the permuted causal mask (the definition), on a batch of two prompts with
    different layouts, with and without grouped KV heads."""
    torch.manual_seed(0)
    vis = torch.cat([_layouts()[name], _layouts()["two images"]])
    perm = aifs.permutation(vis)
    q = torch.randn(2, 4, 23, 16)
    k, v = torch.randn(2, kv_heads, 23, 16), torch.randn(2, kv_heads, 23, 16)
    mask = aifs.permuted_causal_mask(perm, None)
    gqa = kv_heads != 4
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    calls = []
    old_order, old_fn = aifs._current, aifs._original_order
    aifs._current = aifs._Order(perm, torch.argsort(perm, dim=1))
    aifs._original_order = lambda *a, **kw: calls.append(1) or old_fn(*a, **kw)
    try:
        got = aifs.attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        other_len = aifs.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], attn_mask=mask[..., :5, :5], enable_gqa=gqa)
    finally:
        aifs._current, aifs._original_order = old_order, old_fn
    assert calls == [1]  # the sequence of another length (not this prefill) took the mask
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert torch.allclose(other_len, torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :5], k[:, :, :5], v[:, :, :5], attn_mask=mask[..., :5, :5], enable_gqa=gqa), atol=1e-6, rtol=0)
    # negative control: the original-order causal result, left unpermuted, is not the answer
    wrong = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if name != "visual only":
        assert (wrong - ref).abs().max() > 1e-2


def test_model_prefill_takes_the_original_order_path(pair, monkeypatch):
    ad, base, sw = pair
    calls = count_aifs_attention(monkeypatch)
    inp = ad.build_inputs(base, Sample(images(1), "What is shown?"), DEVICE)
    assert torch.allclose(logits(sw, inp), logits(base, inp), atol=1e-5, rtol=0)
    n_layers = len(sw.model.model.language_model.layers)
    assert calls == [inp["input_ids"].shape[1]] * n_layers
    assert sw.model.model.language_model.config._attn_implementation == aifs.ATTN_IMPLEMENTATION
    assert aifs._current is None  # cleared after the forward


def test_padded_batch_keeps_the_mask(pair, monkeypatch):
    _, base, sw = pair
    calls = count_aifs_attention(monkeypatch)
    inp = _left_padded_batch(base.processor, [PAD + " short?", "a much longer question " + PAD + " about this?"], images(2))
    valid = inp["attention_mask"].bool()
    assert torch.allclose(logits(sw, inp)[valid], logits(base, inp)[valid], atol=1e-5, rtol=0)
    assert calls == []
