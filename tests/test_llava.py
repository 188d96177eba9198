"""LLaVA layout (DINOv2 tower read raw by the projector, Llama LM with tied embeddings) on tiny models."""
import copy

import pytest
import torch

from evaluation.builtin import builtin_rows
from exam.common import build_parser, config_from_args
from fake_quant import pipeline
from fake_quant.config import QuantConfig
from fake_quant.quant_utils import PatchConvLinear, QuantLinear
from model import registry
from model.base import Loaded, Sample
from tests import DEVICE, main


def batches(ad, loaded, n=3, seed=11):
    return [ad.build_inputs(loaded, Sample([r["image"]], r["question"]), DEVICE) for r in builtin_rows(n, seed=seed)]


def logits(model, bs):
    with torch.no_grad():
        return torch.cat([model(**b, use_cache=False).logits[0] for b in bs])


@pytest.fixture(scope="module")
def llava():
    ad = registry.get("llava")
    return ad, ad.load("tiny", DEVICE, torch.float32)


def multi_layer_llava():
    """The tiny LLaVA with a projector reading the embeddings, block 1 and the last block, concatenated."""
    from model import tiny

    ad = registry.get("llava")
    model = tiny.llava_model(vision_feature_layer=[0, 1, -1])
    assert model.model.multi_modal_projector.linear_1.in_features == 3 * 96
    return ad, Loaded(model.to(DEVICE), tiny.TinyLlavaProcessor(), "tiny")


@pytest.mark.parametrize("readout", ["last layer", "three layers"])
def test_full_rotation_and_aifs_keep_logits(llava, readout):
    ad, base = llava if readout == "last layer" else multi_layer_llava()
    bs = batches(ad, base)
    ref = logits(base.model, bs)
    rot = Loaded(copy.deepcopy(base.model), base.processor, "tiny")
    cfg = QuantConfig(aifs=True)
    r = cfg.rotation
    r.rotate = r.visual = r.llm = r.online_visual_hadamard = r.online_llm_hadamard = True
    report = pipeline.run(cfg, ad, rot, [], [])
    assert float((logits(rot.model, bs) - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert len(report.rotation["visual"]["online_hadamard"]) == 2
    assert rot.model.lm_head.weight is not rot.model.model.language_model.embed_tokens.weight  # untied
    with torch.no_grad():
        g0 = base.model.generate(**bs[0], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        g1 = rot.model.generate(**bs[0], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(g0, g1)


def test_w4a8_pipeline_quantizes_every_part(tmp_path, llava):
    ad, base = llava
    bs = batches(ad, base, n=4, seed=21)
    ref = logits(base.model, bs)
    flags = ["--model_path", "tiny", "--rotate", "--rotate_visual_clip", "--rotate_llm", "--online_visual_hadamard",
             "--online_llm_hadamard", "--quant", "--quant_visual_clip", "--quant_cross_attention", "--quant_llm",
             "--visual_static", "--llm_static", "--nsamples", "8", "--calib_num", "8"]
    gptq = main("llava", flags + ["--output_dir", str(tmp_path / "g")])["loaded"].model
    rtn = main("llava", flags + ["--visual_w_rtn", "--llm_w_rtn", "--output_dir", str(tmp_path / "r")])["loaded"].model
    qls = [m for m in gptq.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 29 and all(q.weight_quantized and q.input_quantizer.is_frozen for q in qls)
    assert isinstance(gptq.model.vision_tower.embeddings.patch_embeddings.projection, PatchConvLinear)
    e_g = float((logits(gptq, bs) - ref).norm() / ref.norm())
    e_r = float((logits(rtn, bs) - ref).norm() / ref.norm())
    assert e_g < e_r


def test_w8a8_pipeline_on_a_multi_layer_readout():
    ad, base = multi_layer_llava()
    bs = batches(ad, base, n=4, seed=21)
    ref = logits(base.model, bs)
    flags = ["--model_path", "tiny", "--rotate", "--rotate_visual_clip", "--rotate_llm", "--online_visual_hadamard",
             "--online_llm_hadamard",
             "--quant", "--quant_visual_clip", "--quant_cross_attention", "--quant_llm", "--visual_static",
             "--llm_static", "--visual_w_bits", "8", "--llm_w_bits", "8", "--aifs"]
    cfg = config_from_args(build_parser("llava").parse_args(flags))
    q = Loaded(copy.deepcopy(base.model), base.processor, "tiny")
    pipeline.run(cfg, ad, q, batches(ad, base, n=4, seed=5), batches(ad, base, n=4, seed=5))
    assert isinstance(q.model.model.multi_modal_projector.linear_1, QuantLinear)
    err = float((logits(q.model, bs) - ref).norm() / ref.norm())
    assert err < 0.03


def test_unsupported_vision_tower_is_refused():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14),
                      text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, vocab_size=300))
    with pytest.raises(ValueError, match="CLIPVisionModel vision tower is not supported yet"):
        registry.get("llava")._check(LlavaForConditionalGeneration(cfg))
