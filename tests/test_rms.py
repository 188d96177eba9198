"""RMS: the Hadamard-concentrated row mean gets its own branch."""
import math

import pytest
import torch

from evaluation.builtin import builtin_rows
from fake_quant import hadamard_utils as hu
from fake_quant import pipeline
from fake_quant import rotation_utils as ru
from fake_quant.config import QuantConfig
from fake_quant.quant_utils import QuantLinear, WeightQuantizer
from fake_quant.rms import SplitQuantLinear, rms_condition
from fake_quant.spec import get
from model import registry, tiny
from model.base import Sample
from model.qwen2vl import stacks
from tests import DEVICE

DOWN = "model.language_model.layers.{}.mlp.down_proj"


def model_with_row_means(seed=0, offset=0.05):
    """Tiny Qwen2-VL whose LLM down_proj rows carry a mean well above the RMS threshold."""
    m = tiny.qwen2vl_model(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in range(2):
            w = get(m, DOWN.format(i)).weight
            w.add_(offset * torch.randn(w.shape[0], 1, generator=g).sign())
    return m


def test_condition_matches_the_definition():
    w = torch.randn(8, 160) * 0.02
    w[:3] += 0.05
    cond = rms_condition(w)
    assert cond[:3].all() and not cond[3:].any()
    for j in range(8):
        assert bool(cond[j]) == (math.sqrt(160) * abs(float(w[j].mean())) > float(w[j].abs().max()))


def test_split_layer_is_exact_and_reduces_weight_quantization_error():
    m = model_with_row_means()
    inputs = tiny.qwen2vl_inputs()
    with torch.no_grad():
        ref = m(**inputs).logits
    llm = stacks(m)[1]
    W0 = get(m, DOWN.format(0)).weight.detach().clone()
    reports = {}
    ru.add_online_hadamard(m, llm, split=True, split_reports=reports)
    layer = get(m, DOWN.format(0))
    assert isinstance(layer, SplitQuantLinear)
    assert reports[DOWN.format(0)]["rows_meeting_condition"] == 1.0
    with torch.no_grad():
        out = m(**inputs).logits
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5  # quantization off: exactly the same

    # W4 per-channel RTN of the folded weight, with and without the split, on random inputs
    folded = torch.cat([layer.branch.weight, layer.main.weight], dim=1)
    x = hu.hadamard_transform(torch.randn(512, 160))
    wq = WeightQuantizer(bits=4)
    err_unsplit = ((x @ (wq.quantize(folded) - folded).t()) ** 2).mean()
    q_split = torch.cat([wq.quantize(layer.branch.weight), wq.quantize(layer.main.weight)], dim=1)
    err_split = ((x @ (q_split - folded).t()) ** 2).mean()
    # measured on this layer: the split error is ~1/20 of the unsplit one
    assert err_split < err_unsplit / 5
    assert reports[DOWN.format(0)]["scale_reduction"] > 3
    assert torch.allclose(folded[:, 0].double(), W0.double().mean(1) * math.sqrt(160), atol=1e-5)


def test_the_mean_lands_in_exactly_one_channel_for_k_not_one():
    n = 160  # 20 * 2^3: a Paley K-block
    assert hu.hadamard_factor(n)[0] == 20
    c = torch.randn(6, 1, dtype=torch.float64)
    folded = hu.hadamard_transform(c.expand(6, n).contiguous())  # rows that are pure means
    assert torch.allclose(folded[:, 0], c[:, 0] * math.sqrt(n))
    assert folded[:, 1:].abs().max() < 1e-12


def test_no_split_when_no_row_meets_the_condition():
    m = tiny.qwen2vl_model(seed=1)
    reports = {}
    ru.add_online_hadamard(m, stacks(m)[1], split=True, split_reports=reports)
    assert all(not r["split"] for r in reports.values())
    assert all(isinstance(get(m, DOWN.format(i)), QuantLinear) for i in range(2))


@pytest.mark.parametrize("keep_fp", [False, True])
def test_pipeline_quantizes_the_branch_with_its_own_scales_or_keeps_it_fp(keep_fp):
    ad = registry.get("qwen2vl")
    loaded = ad.load("tiny", DEVICE, torch.float32)
    loaded.model = model_with_row_means(seed=2).to(DEVICE)
    rows = builtin_rows(8, seed=0)
    batches = [ad.build_inputs(loaded, Sample([r["image"]], r["question"]), DEVICE) for r in rows]
    cfg = QuantConfig(nsamples=4, calib_num=8)
    r = cfg.rotation
    r.rotate = r.llm = r.online_llm_hadamard = True
    cfg.rms.llm, cfg.rms.keep_fp = True, keep_fp
    cfg.llm.quantize = True
    cfg.llm.weight.bits, cfg.llm.act.bits, cfg.llm.act.static = 4, 8, True
    report = pipeline.run(cfg, ad, loaded, batches[:4], batches)
    assert set(report.rotation["llm"]["rms"]) == {DOWN.format(0), DOWN.format(1)}
    layer = get(loaded.model, DOWN.format(0))
    assert isinstance(layer, SplitQuantLinear)
    assert layer.main.weight_quantized and layer.main.input_quantizer.is_frozen
    if keep_fp:
        assert layer.branch.weight_quantizer is None and layer.branch.input_quantizer is None
    else:
        assert layer.branch.weight_quantized and layer.branch.input_quantizer.is_frozen
        assert layer.branch.input_quantizer.scale is not layer.main.input_quantizer.scale
        # one column per row: a per-channel 4-bit grid holds it exactly
        assert torch.allclose(layer.branch.weight.abs(), layer.branch.weight_scale.to(layer.branch.weight.device).reshape(-1, 1) * 7, rtol=1e-5)
