"""Real int8 / FP8 execution of whole calibrated models: the realized tiny Qwen2-VL (transformers) and Qwen-VL (our
own modelling code) give the fake-quant model's logits, W8A8 and W4A8, MSQ with and without AIFS, with the sink
set, on every kernel family the test device has (the CPU's oneDNN and fbgemm, and torch._int_mm / torch._scaled_mm,
which run on a CPU too); ``--real_quant`` refuses what no kernel serves before any work."""
import json

import pytest
import torch

from evaluation.builtin import builtin_rows
from exam.common import _config_from_dict
from fake_quant import pipeline
from fake_quant.quant_utils import QuantLinear
from fake_quant.realize import SCALED_MM_KERNELS, RealQuantLinear, choose_backend
from fake_quant.spec import set_module
from model.base import Sample
from model.qwen2vl import Qwen2VLAdapter
from tests import DEVICE, main
from tests.test_realize import BACKENDS

# the kernel families for an integer activation grid on the test device
INT_BACKENDS = [*BACKENDS, "int_mm"] if DEVICE == "cpu" else ["int_mm"]

BASE = ("--rotate --rotate_visual_clip --rotate_llm --online_llm_hadamard --online_visual_hadamard --quant "
        "--quant_llm --quant_visual_clip --quant_cross_attention --visual_static --llm_static --visual_w_rtn "
        "--llm_w_rtn --nsamples 2 --calib_num 4 --dtype float32").split()  # float32 on a GPU too: equality checks
W4A8_AIFS_SINK = BASE + "--visual_w_bits 4 --llm_w_bits 4 --aifs --sink_scale --llm_split".split()
W8A8_NO_AIFS = BASE + "--visual_w_bits 8 --llm_w_bits 8".split()


def held_out(adapter, loaded, n=2):
    rows = builtin_rows(40, seed=42)[30:30 + n]  # calibration uses rows 0..3
    return [adapter.build_inputs(loaded, Sample([r["image"]], r["question"]), DEVICE) for r in rows]


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b, use_cache=False).logits[0] for b in batches])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def fake_quant_run(tmp_path, family, flags, name):
    out = main(family, ["--model_path", "tiny", "--output_dir", str(tmp_path / name), *flags])
    loaded, adapter = out["loaded"], out["adapter"]
    batches = held_out(adapter, loaded)
    return loaded, adapter, batches, logits(loaded.model, batches), _config_from_dict(out["results"]["config"])


def realized_logits(cfg, loaded, batches, backend, layouts=None):
    """Realize; per layout the logits and each realized layer's error against its fake-quant layer on the very
    same input (the forward's own row groups included); then put the fake-quant layers back."""
    if layouts is None:
        layouts = ("slices", "gather", "rows") if backend in SCALED_MM_KERNELS else ("slices", "gather", "auto")
    originals = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    report = pipeline.realize(cfg, loaded, backend)
    real = {n: m for n, m in loaded.model.named_modules() if isinstance(m, RealQuantLinear)}
    worst: dict[str, float] = {}

    def compare(name):
        def hook(module, args, out):
            with torch.no_grad():
                ref = originals[name](args[0])
            worst[name] = max(worst.get(name, 0.0), rel(out, ref))
        return hook

    hooks = [m.register_forward_hook(compare(n)) for n, m in real.items()]
    out = {}
    try:
        for layout in layouts:
            for m in real.values():
                m.layout = layout
            out[layout] = logits(loaded.model, batches)
    finally:
        for h in hooks:
            h.remove()
        for n, m in originals.items():
            set_module(loaded.model, n, m)
    return report, list(real.values()), out, worst


@pytest.fixture(scope="module")
def qwen2vl_w4a8(tmp_path_factory):
    return fake_quant_run(tmp_path_factory.mktemp("rq"), "qwen2vl", W4A8_AIFS_SINK, "w4")


@pytest.mark.parametrize("backend", INT_BACKENDS)
def test_qwen2vl_w4a8_msq_aifs_sink_realized_equals_fake_quant(qwen2vl_w4a8, backend):
    loaded, _, batches, ref, cfg = qwen2vl_w4a8
    report, real, out, worst = realized_logits(cfg, loaded, batches, backend)
    # every quantized linear of the three parts: patch embedding, vision blocks, merger, LLM (RMS main + branch)
    assert report.backend == backend and len(real) == len(report.layers) >= 25
    assert report.weight_bits == {4: len(real)}
    llm = [m for m in real if m.num_groups > 1]
    assert llm and all(m.num_groups == 3 for m in llm)  # text, visual and the sink set
    assert set(worst) == set(report.layers) and max(worst.values()) < 1e-5  # every layer, on its own input
    for layout, got in out.items():
        assert rel(got, ref) < 1e-3, layout  # measured 2.2e-7


def test_qwen2vl_negative_control_swapped_modality_scales_change_the_logits(qwen2vl_w4a8):
    loaded, _, batches, ref, cfg = qwen2vl_w4a8
    originals = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    pipeline.realize(cfg, loaded)
    try:
        for m in loaded.model.modules():
            if isinstance(m, RealQuantLinear) and m.num_groups == 3:
                m.scales = [m.scales[1], m.scales[0], m.scales[2]]  # text rows on the visual scale and back
                m.scale_table = m.scale_table[[1, 0, 2]]
        assert rel(logits(loaded.model, batches), ref) > 1e-2
    finally:
        for n, m in originals.items():
            set_module(loaded.model, n, m)


@pytest.mark.parametrize("kernels", ["auto", "int_mm, CUDA shape rules"])
def test_qwen2vl_realized_generation_matches_fake_quant(qwen2vl_w4a8, kernels):
    """Decode steps (text rows only, through the KV cache of an AIFS-reordered prefill) on the int8 kernels; with
    int_mm under the CUDA shape rules each one-row decode step is padded to the kernel's minimum rows."""
    from fake_quant.realize import RealizeOptions, realize

    loaded, _, batches, _, cfg = qwen2vl_w4a8
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = loaded.model.generate(**batches[0], **gen)
        originals = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
        if kernels == "auto":
            pipeline.realize(cfg, loaded)
        else:
            realize(loaded.model, RealizeOptions(backend="int_mm", layout="rows", shape_rules=True))
            assert all(m.kernel.shape_rules for m in loaded.model.modules() if isinstance(m, RealQuantLinear))
        try:
            out = loaded.model.generate(**batches[0], **gen)
        finally:
            for n, m in originals.items():
                set_module(loaded.model, n, m)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["qwen2vl", "qwenvl"])
def test_w8a8_msq_without_aifs_realized_equals_fake_quant(tmp_path, family):
    """W8A8, MSQ without AIFS (its rows gathered), on both backends; then the exam scripts' ``--real_quant``
    (same seed and flags: the same calibrated model) gives the same realized model.

    Every realized layer equals its fake-quant layer on the same input to float accumulation (measured
    <= 3e-7). End to end, the tiny random Qwen-VL amplifies those 1e-7 input differences: two activation codes
    of layer 0's MLP sit on a rounding boundary and flip, and the random weights grow the difference about
    3x per sublayer, to 6e-3 at the logits (1/6 of the quantization error itself). The tiny Qwen2-VL can flip
    one too (3.6e-3 with the default weight grid, a quarter of its 1.4% quantization error; 3e-5 with absmax /
    qmax), so both are held to half the quantization error; the per-layer bound above is the exact check."""
    loaded, _, batches, ref, cfg = fake_quant_run(tmp_path, family, W8A8_NO_AIFS, "fake")
    fp = out_fp = None
    for backend in INT_BACKENDS:
        report, real, out, worst = realized_logits(cfg, loaded, batches, backend, layouts=("gather", "slices"))
        assert report.weight_bits == {8: len(real)} and all(m.num_groups in (1, 2) for m in real)
        assert set(worst) == set(report.layers) and max(worst.values()) < 1e-5
        if fp is None:
            fp = main(family, ["--model_path", "tiny", "--dtype", "float32", "--output_dir", str(tmp_path / "fp")])["loaded"]
            out_fp = logits(fp.model, batches)
        assert rel(out["gather"], ref) < 0.5 * rel(ref, out_fp)
        if backend == choose_backend("auto", DEVICE):
            auto = out["gather"]
    cli = main(family, ["--model_path", "tiny", "--output_dir", str(tmp_path / "real"), *W8A8_NO_AIFS,
                        "--real_quant"])
    real_model = cli["loaded"].model
    real = [m for m in real_model.modules() if isinstance(m, RealQuantLinear)]
    auto_backend = choose_backend("auto", DEVICE)
    # a one-image prompt: few runs, so the CPU kernels slice them in prompt order ("auto"), the GPU ones take a
    # scale per row; either way the rows gathered above, in another order of float operations
    assert real and all(m.layout == ("rows" if auto_backend in SCALED_MM_KERNELS else "auto") for m in real)
    assert not any(isinstance(m, QuantLinear) and m.input_quantizer is not None for m in real_model.modules())
    assert rel(logits(real_model, batches), auto) < 1e-5
    rq = json.loads((tmp_path / "real" / "results.json").read_text())["real_quant"]
    assert rq["backend"] == auto_backend and len(rq["layers"]) == len(real) and rq["weight_bits"] == {"8": len(real)}


def fp8_available():
    from fake_quant.scaled_mm import fp8_supported

    return fp8_supported(torch.device(DEVICE)) is None


@pytest.mark.skipif(not fp8_available(), reason="the test device has no FP8 matmul")
def test_w4a8_e4m3_realized_on_fp8_equals_fake_quant_and_the_cli_runs_it(tmp_path):
    """Activations calibrated on the FP8 grid (--a_format e4m3), W4 weights, MSQ + AIFS + sink set + RMS: the model
    on torch._scaled_mm gives the fake-quant logits in every layout; then ``--real_quant`` picks fp8 on its own
    and one call per layer with a scale per row."""
    flags = [*W4A8_AIFS_SINK, "--a_format", "e4m3"]
    loaded, _, batches, ref, cfg = fake_quant_run(tmp_path, "qwen2vl", flags, "fake")
    assert {m.input_quantizer.bit_type.name for m in loaded.model.modules()
            if isinstance(m, QuantLinear) and m.input_quantizer is not None} == {"fp8_e4m3"}
    report, real, out, worst = realized_logits(cfg, loaded, batches, "fp8")
    assert report.backend == "fp8" and report.weight_bits == {4: len(real)} and len(real) >= 25
    assert set(worst) == set(report.layers) and max(worst.values()) < 1e-5
    for layout, got in out.items():
        assert rel(got, ref) < 1e-3, layout
    cli = main("qwen2vl", ["--model_path", "tiny", "--output_dir", str(tmp_path / "real"), *flags, "--real_quant"])
    real = [m for m in cli["loaded"].model.modules() if isinstance(m, RealQuantLinear)]
    assert real and all(m.kernel.name == "fp8" and m.layout == "rows" for m in real)
    assert rel(logits(cli["loaded"].model, batches), ref) < 1e-3
    rq = json.loads((tmp_path / "real" / "results.json").read_text())["real_quant"]
    assert rq["backend"] == "fp8" and len(rq["layers"]) == len(real)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--llm_a_bits", "4"], "--llm_a_bits 4: no int8 kernel multiplies A4"),
        (["--visual_a_bits", "6"], "--visual_a_bits 6"),
        (["--a_groupsize", "64"], "group-wise activations (--a_groupsize 64)"),
        (["--act_per_tensor"], "dynamic per-tensor activations (--act_per_tensor)"),
        (["--w_groupsize", "32"], "--w_groupsize 32 (group-wise) has no kernel"),
        (["--a_asym"], "dynamic activations run symmetric per-token; drop --a_asym"),
        (["--llm_w_bits", "16"], "set --llm_w_bits to 8 or less"),
        (["--device", "cuda"], "CUDA is not available on this machine") if not torch.cuda.is_available() else
        (["--real_quant_backend", "onednn", "--device", "cuda"], "the onednn kernels run on the CPU"),
        (["--llm_static", "--real_quant_backend", "fp8"], "calibrate them on the FP8 grid (--a_format e4m3)"),
        (["--a_format", "e4m3", "--real_quant_backend", "fp8", "--llm_w_bits", "8"],
         "--llm_w_bits 8 needs int_mm"),
        (["--a_format", "e4m3", "--real_quant_backend", "onednn"], "run on the fp8 kernels only, not onednn"),
        (["--a_format", "e4m3", "--a_asym"], "--a_format e4m3 is symmetric: drop --a_asym"),
        (["--real_quant_layout", "rows", "--real_quant_backend", "fbgemm"], "--real_quant_layout rows needs"),
    ],
)
def test_real_quant_refuses_what_no_kernel_serves_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    def never(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(Qwen2VLAdapter, "load", never)
    flags = ["--model_path", "tiny", "--quant", "--quant_llm", "--quant_visual_clip", "--real_quant",
             "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main("qwen2vl", flags + extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_real_quant_on_a_build_without_the_ops_names_the_op(tmp_path, capsys, monkeypatch):
    class NoOps:
        pass

    monkeypatch.setattr(torch.ops, "onednn", NoOps())
    with pytest.raises(SystemExit):
        main("qwen2vl", ["--model_path", "tiny", "--quant", "--quant_llm", "--llm_static", "--real_quant",
                         "--real_quant_backend", "onednn", "--output_dir", str(tmp_path)])
    assert "torch.ops.onednn.qlinear_prepack is missing from this torch build" in capsys.readouterr().err


def test_real_quant_options_need_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main("qwen2vl", ["--model_path", "tiny", "--real_quant_fuse", "--output_dir", str(tmp_path)])
    assert "need --real_quant" in capsys.readouterr().err


def test_real_quant_fuse_without_a_compiler_is_refused_first(tmp_path, capsys, monkeypatch):
    import fake_quant.realize as rz

    monkeypatch.setattr(rz, "cpp_compiler", lambda: None)
    with pytest.raises(SystemExit):
        main("qwen2vl", ["--model_path", "tiny", "--quant", "--quant_llm", "--llm_static", "--real_quant",
                         "--real_quant_fuse", "--output_dir", str(tmp_path)])
    assert "--real_quant_fuse compiles the quantization with torch.compile, which needs a C++ compiler" in \
        capsys.readouterr().err
