"""End to end on tiny random Qwen2-VL / Qwen2.5-VL: the exam entry point, the pipeline, save/load."""
import json

import pytest
import torch

from evaluation.builtin import builtin_rows
from fake_quant import pipeline
from fake_quant.config import QuantConfig
from fake_quant.quant_utils import PatchConvLinear, QuantLinear
from model import registry
from model.base import Sample
from model.qwen2vl import Qwen2VLAdapter, Qwen25VLAdapter
from tests import DEVICE, main

PAPER_W4A8 = ("--rotate --rotate_visual_clip --rotate_visual_cross_attn --rotate_llm --visual_w_bits 4 --visual_a_bits 8 "
              "--llm_w_bits 4 --llm_a_bits 8 --quant --quant_llm --quant_visual_clip --quant_cross_attention "
              "--visual_w_clip --llm_w_clip --visual_static --llm_static --online_llm_hadamard "
              "--online_visual_hadamard --nsamples 8 --calib_num 16").split()


def held_out_batches(adapter, loaded, n=6):
    rows = builtin_rows(60, seed=42)[40:40 + n]  # calibration uses rows 0..15
    return [adapter.build_inputs(loaded, Sample([r["image"]], r["question"]), DEVICE) for r in rows]


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b, use_cache=False).logits[0] for b in batches])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def fp_reference():
    ad = registry.get("qwen2vl")
    fp = ad.load("tiny", DEVICE, torch.float32)
    batches = held_out_batches(ad, fp)
    return batches, logits(fp.model, batches)


def run(tmp_path, *extra, name="run"):
    return main("qwen2vl", ["--model_path", "tiny", "--output_dir", str(tmp_path / name), *PAPER_W4A8, *extra])


@pytest.mark.parametrize("family", ["qwen2vl", "qwen2_5vl"])
def test_rotation_without_quantization_keeps_logits(family):
    ad = registry.get(family)
    loaded = ad.load("tiny", DEVICE, torch.float32)
    batches = held_out_batches(ad, loaded, 3)
    ref = logits(loaded.model, batches)
    cfg = QuantConfig()
    r = cfg.rotation
    r.rotate = r.visual = r.llm = r.online_llm_hadamard = r.online_visual_hadamard = True
    report = pipeline.run(cfg, ad, loaded, [], [])
    out = logits(loaded.model, batches)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert set(report.rotation) == {"visual", "llm"}


def test_w8a8_static_close_to_fp_and_gptq_beats_rtn(tmp_path, fp_reference):
    batches, ref = fp_reference
    w8 = run(tmp_path, "--visual_w_bits", "8", "--llm_w_bits", "8", name="w8")
    gptq = run(tmp_path, "--act_order", name="gptq")
    rtn = run(tmp_path, "--visual_w_rtn", "--llm_w_rtn", name="rtn")
    e8, eg, er = (rel(logits(o["loaded"].model, batches), ref) for o in (w8, gptq, rtn))
    assert e8 < 0.03          # W8A8 static: measured ~1% relative logit error on held-out rows
    assert eg < 0.5 * er      # W4A8: GPTQ well below RTN (measured ~2.6% vs ~14%)
    # every linear of the three parts is quantized, with static activation scales
    model = gptq["loaded"].model
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 25 and all(q.weight_quantized for q in qls)  # patch embedding + 24 linears
    assert isinstance(model.model.visual.patch_embed.proj, PatchConvLinear)
    assert all(q.input_quantizer.static and q.input_quantizer.is_frozen for q in qls)
    assert not isinstance(model.lm_head, QuantLinear)
    res = json.loads((tmp_path / "gptq" / "results.json").read_text())
    assert res["calibration"]["gptq_rows"] == list(range(8))
    assert res["calibration"]["static_rows"] == list(range(16))
    assert res["demo"]["row"] not in res["calibration"]["static_rows"]
    assert {"rotate", "weights:visual", "weights:connector", "weights:llm", "calibrate"} <= set(res["pipeline"]["seconds"])
    assert res["memory"]["peak_rss_mb"] > 0


def test_dump_then_load_reproduces_logits_exactly(tmp_path, fp_reference):
    batches, _ = fp_reference
    dump = tmp_path / "ckpt"
    first = run(tmp_path, "--act_order", "--dump_gptq", str(dump), name="a")
    assert (dump / "model.safetensors").is_file() and json.loads((dump / "mquant.json").read_text())["calibrated"]
    second = run(tmp_path, "--act_order", "--load_gptq", str(dump), name="b")
    assert torch.equal(logits(first["loaded"].model, batches), logits(second["loaded"].model, batches))
    assert "weights:llm" not in second["results"]["pipeline"]["seconds"]  # GPTQ was skipped


def test_same_seed_same_model(tmp_path):
    a = run(tmp_path, "--visual_w_rtn", name="a")["loaded"].model.state_dict()
    b = run(tmp_path, "--visual_w_rtn", name="b")["loaded"].model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generate_on_the_quantized_model(tmp_path):
    out = run(tmp_path, "--llm_w_rtn", "--visual_w_rtn")
    ad, loaded = out["adapter"], out["loaded"]
    inputs = held_out_batches(ad, loaded, 1)[0]
    gen = loaded.model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 5
    assert isinstance(out["results"]["demo"]["answer"], str)


def test_qwen25_checkpoint_selects_its_adapter(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    assert isinstance(registry.for_checkpoint(str(tmp_path), "qwen2vl"), Qwen25VLAdapter)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    assert type(registry.for_checkpoint(str(tmp_path), "qwen2vl")) is Qwen2VLAdapter


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "--model_path"),
        (["--model_path", "{tmp}/nothing"], "is not a folder"),
        (["--model_path", "{tmp}"], "has no config.json"),
        (["--model_path", "{tmp}/llama"], "unsupported architecture ['LlamaForCausalLM'] in"),
        (["--model_path", "{tmp}/llama"], "it is served by the 'causal_lm' family"),
        (["--model_path", "tiny", "--online_llm_hadamard"], "--online_llm_hadamard needs --rotate_llm"),
        (["--model_path", "tiny", "--rotate", "--rotate_visual_clip", "--visual_split"],
         "--visual_split needs --online_visual_hadamard"),
        (["--model_path", "tiny", "--quant", "--quant_llm", "--nsamples", "1000"],
         "ask for 1000 calibration rows but the built-in set has 256"),
        (["--model_path", "tiny", "--quant_llm"], "need --quant"),
        (["--model_path", "tiny", "--dataset_name", "OCRBench", "--eval_backend", "vlmeval"],
         "--eval_backend vlmeval needs VLMEvalKit importable as `vlmeval`"),
        (["--model_path", "tiny", "--dataset_name", "Nope", "--data_root", "{tmp}"], "Nope.tsv not found"),
        (["--model_path", "tiny", "--quant", "--quant_llm", "--llm_static", "--a_groupsize", "64"],
         "--llm_static cannot be combined with --a_groupsize"),
    ],
)
def test_bad_input_fails_clearly(tmp_path, capsys, argv, message):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        main("qwen2vl", argv + ["--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_offload_gives_the_same_model_and_streams_blocks(tmp_path, fp_reference):
    batches, _ = fp_reference
    plain = run(tmp_path, "--llm_w_rtn", name="plain")
    off = run(tmp_path, "--llm_w_rtn", "--offload", name="off")
    offloader = off["loaded"].offloader
    assert offloader is not None and len(offloader.blocks) == 4  # 2 vision blocks + 2 LLM layers
    assert offloader.moves >= 4  # every block visited the device at least once (pinned for GPTQ)
    assert torch.equal(logits(plain["loaded"].model, batches), logits(off["loaded"].model, batches))
    assert all(p.device.type == "cpu" for b in offloader.blocks.values() for p in b.parameters())


def test_group_size_falls_back_to_per_channel_where_it_does_not_divide(tmp_path, caplog):
    out = run(tmp_path, "--w_groupsize", "16", "--visual_w_rtn", "--llm_w_rtn")
    qls = {n: m for n, m in out["loaded"].model.named_modules() if isinstance(m, QuantLinear)}
    patch = qls["model.visual.patch_embed.proj.linear"]
    assert patch.in_features == 1176 and patch.weight_quantizer.group_size is None  # 1176 = 3*2*14*14, not /16
    grouped = [q for q in qls.values() if q.in_features % 16 == 0]
    assert len(grouped) == len(qls) - 1 and all(q.weight_quantizer.group_size == 16 for q in grouped)
    assert "quantized per output channel instead: model.visual.patch_embed.proj.linear" in caplog.text
