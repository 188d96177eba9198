"""The blocked bf16 causal prefill attention (fake_quant.prefill_attention) against float64 SDPA and against
transformers' eager attention, where it applies and where it must not, and inside models."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fake_quant import aifs, pipeline, prefill_attention
from fake_quant.config import QuantConfig
from model import registry
from model.base import Loaded, Sample
from tests import DEVICE
from tests.test_aifs import images


def qkv(b=2, heads=6, kv=2, n=300, d=32, seed=0, gain=1.0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = gain * torch.randn(b, heads, n, d, generator=g)
    k = torch.randn(b, kv, n, d, generator=g)
    v = torch.randn(b, kv, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference(q, k, v, scale=None):
    """float64 SDPA of the same bf16 inputs, keys and values repeated per query head."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                          v.double().repeat_interleave(rep, 1), is_causal=True, scale=scale)


@pytest.mark.parametrize("heads,kv", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("block", [7, 128, 1000])
def test_equals_float64_attention_within_bf16_rounding(heads, kv, block):
    q, k, v = qkv(heads=heads, kv=kv)
    ref = reference(q, k, v)
    got = prefill_attention.blocked_causal(q, k, v, block=block)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads)
    err, sdpa_err = (got.double() - ref).abs().max(), (sdpa.double() - ref).abs().max()
    # bf16 output rounding alone is ~4e-3 on values of this size; torch's own bf16 kernel is measured alongside
    assert err < 2e-2, (err, sdpa_err)
    assert (got.double() - ref).norm() / ref.norm() < 5e-3
    # the first query sees only the first key: its output is that value, to bf16 rounding
    assert torch.allclose(got[:, :, 0].double(), v.double().repeat_interleave(heads // kv, 1)[:, :, 0], atol=1e-2)


def test_large_scores_and_an_explicit_scale():
    """Peaked softmax (query gain 6, scores up to ~30): still within bf16 rounding of float64."""
    q, k, v = qkv(gain=6.0, seed=1)
    for scale in (None, 0.05):
        ref = reference(q, k, v, scale)
        got = prefill_attention.blocked_causal(q, k, v, scale=scale, block=64)
        assert (got.double() - ref).norm() / ref.norm() < 1.5e-2


def test_agrees_with_transformers_eager_attention():
    """An independent implementation of the same bf16 arithmetic: transformers' eager attention (scores in bf16,
    softmax in float32), fed the additive causal mask."""
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    q, k, v = qkv(heads=6, kv=2, n=200, d=64)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 3, False
    mask = torch.full((200, 200), float("-inf")).triu(1).to(torch.bfloat16)[None, None]
    eager, _ = eager_attention_forward(module, q, k, v, mask, scaling=64 ** -0.5)  # [b, n, heads, d]
    got = prefill_attention.blocked_causal(q, k, v, block=32).transpose(1, 2)
    assert (got.float() - eager.float()).norm() / eager.float().norm() < 5e-3
    assert (got.float() - eager.float()).abs().max() < 3e-2


def test_negative_controls_move_the_output():
    """No mask on the diagonal block, or the diagonal itself masked off, are far from the reference."""
    q, k, v = qkv(n=64)
    ref = reference(q, k, v)
    rep = 3
    full = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                          v.double().repeat_interleave(rep, 1))
    assert (full - ref).abs().max() > 0.5
    got = prefill_attention.blocked_causal(q, k, v, block=16)
    assert (got.double() - full).abs().max() > 0.5


def test_mode_routing_and_fallbacks():
    q, k, v = qkv(n=300)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert prefill_attention.mode() == "sdpa"
    assert torch.equal(prefill_attention.causal(q, k, v, enable_gqa=True), plain)  # off by default
    with prefill_attention.use("blocked"):
        assert prefill_attention.applies(q, k)
        got = prefill_attention.causal(q, k, v, enable_gqa=True)
        assert torch.equal(got, prefill_attention.blocked_causal(q, k, v))
        assert not torch.equal(got, plain)
        # float32, a short prompt, queries shorter than the keys (a cache): SDPA, bit for bit
        q32, k32, v32 = (t.float() for t in (q, k, v))
        assert not prefill_attention.applies(q32, k32)
        assert torch.equal(prefill_attention.causal(q32, k32, v32, enable_gqa=True),
                           F.scaled_dot_product_attention(q32, k32, v32, is_causal=True, enable_gqa=True))
        short = [t[:, :, :100] for t in (q, k, v)]
        assert not prefill_attention.applies(short[0], short[1])
        assert torch.equal(prefill_attention.causal(*short, enable_gqa=True),
                           F.scaled_dot_product_attention(*short, is_causal=True, enable_gqa=True))
        assert not prefill_attention.applies(q[:, :, -1:], k)
        # grouped heads without enable_gqa: SDPA decides (it refuses the shapes, as it would have)
        with pytest.raises(RuntimeError):
            prefill_attention.causal(q, k, v)
    assert prefill_attention.mode() == "sdpa"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="choose one of sdpa, blocked"):
        prefill_attention.set_mode("flash")
    q, k, v = qkv(heads=6, kv=4, n=20)
    with pytest.raises(ValueError, match="kv dividing h"):
        prefill_attention.blocked_causal(q, k, v)


@pytest.fixture(scope="module")
def bf16_pair():
    """The tiny Qwen2-VL in bf16 through the project's attention implementation, and an AIFS copy of it."""
    ad = registry.get("qwen2vl")
    base = ad.load("tiny", "cpu", torch.float32)
    base.model.to(torch.bfloat16)
    aifs.use_project_attention(base.model.model.language_model)
    switched = Loaded(copy.deepcopy(base.model), base.processor, "tiny")
    pipeline.rebuild(QuantConfig(aifs=True), ad, switched)
    return ad, base, switched


def test_models_take_the_blocked_path(bf16_pair, monkeypatch):
    """A transformers decoder (plain causal prefill) and the AIFS model (original-order prefill) run it in every
    layer when it is on, and stay within bf16 rounding of their SDPA logits."""
    ad, base, sw = bf16_pair
    monkeypatch.setattr(prefill_attention, "MIN_TOKENS", 8)
    monkeypatch.setattr(prefill_attention, "BLOCK_ROWS", 10)  # blocks of a few queries
    calls = []
    fn = prefill_attention.blocked_causal
    monkeypatch.setattr(prefill_attention, "blocked_causal",
                        lambda q, *a, **kw: calls.append(q.shape[2]) or fn(q, *a, **kw))
    inp = ad.build_inputs(base, Sample(images(1), "What is shown?"), "cpu")
    inp["pixel_values"] = inp["pixel_values"].to(torch.bfloat16)
    n = inp["input_ids"].shape[1]
    layers = len(base.model.model.language_model.layers)
    with torch.no_grad():
        for loaded in (base, sw):
            ref = loaded.model(**inp, use_cache=False).logits.float()
            assert calls == []
            with prefill_attention.use("blocked"):
                got = loaded.model(**inp, use_cache=False).logits.float()
            assert calls == [n] * layers
            calls.clear()
            assert (got - ref).norm() / ref.norm() < 2e-2
            assert not torch.equal(got, ref)


@pytest.mark.skipif(DEVICE != "cpu", reason="the blocked attention is a CPU path")
def test_exam_runs_the_blocked_attention_and_records_it(tmp_path, monkeypatch):
    """``--prefill_attention blocked --dtype bfloat16`` on a CPU: the tiny Qwen2-VL's prefills take it (prompts of
    the tiny model are short: the threshold is lowered for the test), results.json says so, the mode is restored."""
    import json

    from tests import main

    monkeypatch.setattr(prefill_attention, "MIN_TOKENS", 8)
    calls = []
    fn = prefill_attention.blocked_causal
    monkeypatch.setattr(prefill_attention, "blocked_causal",
                        lambda q, *a, **kw: calls.append(q.shape[2]) or fn(q, *a, **kw))
    main("qwen2vl", ["--model_path", "tiny", "--dtype", "bfloat16", "--prefill_attention", "blocked",
                     "--output_dir", str(tmp_path)])
    assert calls and min(calls) >= 8
    assert json.loads((tmp_path / "results.json").read_text())["model"]["prefill_attention"] == "blocked"
    assert prefill_attention.mode() == "sdpa"


@pytest.mark.parametrize("extra", [[], ["--dtype", "float32"]])
def test_exam_refuses_the_blocked_attention_outside_cpu_bf16(tmp_path, capsys, extra):
    from tests import main

    with pytest.raises(SystemExit):
        main("qwen2vl", ["--model_path", "tiny", "--prefill_attention", "blocked", *extra,
                         "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--prefill_attention blocked computes the attention with bf16 GEMMs on a CPU" in err
    assert "add --device cpu --dtype bfloat16" in err
