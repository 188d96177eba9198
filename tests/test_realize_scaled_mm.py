"""The GPU kernels' arithmetic, checked on this machine: ``torch._int_mm`` (int8) and ``torch._scaled_mm`` (FP8
e4m3) run on the CPU too, so a realized layer on them must compute what its fake-quant layer computes -- with
one scale, MSQ and sink sets (slices, gather, or one call with a scale per row), dynamic per token, with the
CUDA kernels' shape rules (padding) forced on, and with a bf16 output that puts the scales into the kernel.
A GPU changes only the speed: ``MQUANT_TEST_DEVICE=cuda`` runs the layer checks below on it (the CUDA kernels'
shape rules then apply whatever ``shape_rules`` says) and the model checks in ``test_realize_models.py``."""
import pytest
import torch
from torch import nn

from fake_quant import realize as rz
from fake_quant.bit_type import get_bit_type
from fake_quant.modality import TEXT, VISUAL
from fake_quant.quant_utils import ActQuantizer, QuantLinear, RowGroupContext
from fake_quant.scaled_mm import Fp8Linear, IntMMLinear
from tests import DEVICE
from tests.test_realize import REDUCTIONS, SINK, OpRecorder, calibrated, groups_index, layer_input, realized, rel

FP8 = torch.float8_e4m3fn
# (backend, weight bits, activation grid): fp8 takes e4m3 activations and weights of at most 5 bits
KERNELS = [("int_mm", 8, "int"), ("int_mm", 4, "int"), ("fp8", 4, "e4m3")]
CASES = ["one scale", "msq+sink slices", "msq+sink gather", "msq+sink rows", "interleaved rows",
         "asym activations", "dynamic", "rotation"]


def case_setup(case, fmt, w_bits, seed=0, dims=(64, 48), idx=None):
    """A calibrated layer (on the CPU) moved to the test device, its input and row groups there."""
    ctx = RowGroupContext()
    static = case != "dynamic"
    groups = 1 if case in ("one scale", "dynamic") else 3
    ql = calibrated(static, w_bits, groups, a_sym=case != "asym activations", rotation=case == "rotation", ctx=ctx,
                    fmt=fmt, seed=seed, dims=dims).to(DEVICE)
    idx = groups_index(contiguous="interleaved" not in case) if idx is None else idx
    ctx.set(idx.to(DEVICE))
    return ql, layer_input(idx, seed + 1, dims[0]).to(DEVICE)


def layout_of(case):
    return "gather" if "gather" in case else ("rows" if "rows" in case else "slices")


@pytest.mark.parametrize("shape_rules", [False, True])
@pytest.mark.parametrize("backend,w_bits,fmt,case", [(*k, c) for k in KERNELS for c in CASES
                                                      if not (c == "asym activations" and k[2] == "e4m3")])
def test_realized_layer_equals_fake_quant(backend, w_bits, fmt, case, shape_rules):
    ql, x = case_setup(case, fmt, w_bits)
    with torch.no_grad():
        ref = ql(x)
        real, report = realized(ql, backend=backend, layout=layout_of(case), shape_rules=shape_rules)
        out = real(x)
    assert real.kernel.w_t.device == x.device
    assert isinstance(real.kernel, {"int_mm": IntMMLinear, "fp8": Fp8Linear}[backend]) and report.backend == backend
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel(out, ref) < 1e-5  # only the float accumulation order differs (measured ~1.5e-7)


@pytest.mark.parametrize("backend,w_bits,fmt", KERNELS)
@pytest.mark.parametrize("case", ["one scale", "msq+sink rows", "dynamic"])
def test_cuda_shape_rules_pad_odd_widths_and_few_rows(backend, w_bits, fmt, case):
    """60 inputs, 44 outputs, 10 rows: the kernels' multiples (8 / 16) and _int_mm's more-than-16 rows are met
    by zero padding, and the padding changes no number."""
    idx = groups_index(batch=1, seq=10, visual=(2, 7))
    ql, x = case_setup(case, fmt, w_bits, seed=3, dims=(60, 44), idx=idx)
    with torch.no_grad():
        ref = ql(x)
        real, _ = realized(ql, backend=backend, layout="rows", shape_rules=True)
        out = real(x)
    k = real.kernel
    assert k.w_t.shape[0] % k.k_multiple == 0 and k.w_t.shape[1] % k.n_multiple == 0
    assert (k.k_pad, k.n_pad) == (4, 4)  # 60 -> 64 inputs, 44 -> 48 outputs
    assert out.shape == ref.shape and rel(out, ref) < 1e-5


def test_fp8_bf16_output_takes_the_row_scales_into_the_kernel():
    """With a bf16 output the rows' scales go into _scaled_mm as scale_a [M, 1] and the channel scales as
    scale_b [1, N] (cuBLAS's rowwise FP8); the result is the fp32 one rounded to bf16."""
    ql, x = case_setup("msq+sink rows", "e4m3", 4)
    xb = x.bfloat16()
    seen = []

    class Spy(OpRecorder):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket.__name__ == "_scaled_mm":
                kw = kwargs or {}
                scale_a = kw.get("scale_a", args[2] if len(args) > 2 else None)
                scale_b = kw.get("scale_b", args[3] if len(args) > 3 else None)
                seen.append((tuple(scale_a.shape), tuple(scale_b.shape)))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        ref = ql(xb.float())  # the same (bf16-rounded) input in fp32
        real, _ = realized(ql, backend="fp8", layout="rows")
        with Spy():
            out = real(xb)
    assert out.dtype == torch.bfloat16
    assert seen == [((x.shape[0] * x.shape[1], 1), (1, 48))]
    assert rel(out.float(), ref) < 4e-3  # bf16 output rounding (2^-9 relative) and nothing else


def test_e4m3_static_scale_is_the_calibration_amax_over_448():
    torch.manual_seed(0)
    aq = ActQuantizer(8, True, "tensor", static=True, fmt="e4m3")
    x = torch.randn(50, 32) * 3
    aq.start_calibration()
    aq(x)
    aq.freeze()
    assert torch.allclose(aq.scale.reshape(()), x.abs().max() / 448, rtol=1e-6)
    y = aq(x * 1.5) / aq.scale.reshape(())  # beyond the calibrated range: saturates at 448
    assert torch.equal(y, y.to(FP8).float()) and float(y.abs().max()) == 448.0
    assert get_bit_type(8, True, "e4m3").name in repr(aq)


@pytest.mark.parametrize("backend,fmt", [("int_mm", "int"), ("fp8", "e4m3")])
@pytest.mark.parametrize("layout", ["slices", "gather", "rows"])
def test_static_path_computes_no_statistic_of_its_input(backend, fmt, layout):
    ctx = RowGroupContext()
    one = calibrated(groups=1, w_bits=4, rotation=True, ctx=ctx, fmt=fmt)
    msq = calibrated(groups=3, w_bits=4, rotation=True, ctx=ctx, seed=1, fmt=fmt)
    dyn = calibrated(static=False, w_bits=4, rotation=True, ctx=ctx, seed=2, fmt=fmt)
    idx = groups_index()
    x = layer_input(idx, 4)
    ctx.set(idx)
    seen = {}
    with torch.no_grad():
        for name, ql in (("one", one), ("msq", msq), ("dynamic", dyn)):
            layer = realized(ql, backend=backend, layout=layout)[0]
            with OpRecorder() as rec:
                layer(x)
            seen[name] = set(rec.ops)
    assert not seen["one"] & REDUCTIONS and not seen["msq"] & REDUCTIONS, seen
    assert "amax" in seen["dynamic"]  # the recorder does see a row statistic where there is one
    # no value is read back to the host (.item(), float(tensor)): on a GPU that would stall every layer
    assert not any("_local_scalar_dense" in ops for ops in seen.values()), seen
    assert all({"_int_mm": backend == "int_mm", "_scaled_mm": backend == "fp8"}.items() <=
               {k: k in ops for k in ("_int_mm", "_scaled_mm")}.items() for ops in seen.values())


@pytest.mark.parametrize("backend,fmt", [("int_mm", "int"), ("fp8", "e4m3")])
def test_negative_controls_wrong_row_scales_are_caught(backend, fmt):
    ql, x = case_setup("msq+sink rows", fmt, 4, seed=5)
    ctx = ql.input_quantizer.context
    with torch.no_grad():
        ref = ql(x)
        real, _ = realized(ql, backend=backend, layout="rows")
        assert rel(real(x), ref) < 1e-5
        good = real.scale_table.clone()
        real.scale_table = good * 1.5                          # a wrong activation scale
        assert rel(real(x), ref) > 1e-2
        real.scale_table = good[[VISUAL, TEXT, SINK]]          # text rows on the visual scale and back
        assert rel(real(x), ref) > 1e-2
        real.scale_table = good
        idx = ctx.index
        ctx.set(torch.zeros_like(idx))                         # every row told it is text
        assert rel(real(x), ref) > 1e-2


def test_what_a_kernel_cannot_take_is_refused_by_name():
    ql8 = calibrated(groups=1, w_bits=8, fmt="e4m3")
    with pytest.raises(ValueError, match="not exact in e4m3.*int_mm"):
        realized(ql8, backend="fp8")
    int_grid = calibrated(groups=1, w_bits=4)
    with pytest.raises(ValueError, match="int8 grid, which the fp8 kernel does not take"):
        realized(int_grid, backend="fp8")
    e4m3 = calibrated(groups=1, w_bits=4, fmt="e4m3")
    with pytest.raises(ValueError, match="e4m3 grid, which the int_mm kernel does not take"):
        realized(e4m3, backend="int_mm")
    for cpu in ("onednn", "fbgemm"):
        if cpu in rz.BACKENDS:
            with pytest.raises(ValueError, match=f"e4m3 grid, which the {cpu} kernel does not take"):
                realized(calibrated(groups=1, w_bits=4, fmt="e4m3"), backend=cpu)
    with pytest.raises(ValueError, match="layout 'rows' needs a kernel with a row-scale epilogue"):
        realized(calibrated(groups=3, w_bits=4, ctx=RowGroupContext()), backend="onednn", layout="rows")


def test_backend_choice_follows_device_and_grid():
    assert rz.choose_backend("auto", "cpu", "e4m3") == "fp8"
    assert rz.choose_backend("auto", "cuda", "int") == "int_mm"  # picks without touching a GPU
    with pytest.raises(rz.KernelUnavailable, match="the onednn kernels run on the CPU, the model is on cuda"):
        rz.choose_backend("onednn", "cuda")
    with pytest.raises(ValueError, match="unknown real-quant backend"):
        rz.choose_backend("cutlass")


def test_fp8_kernel_holds_w4_codes_exactly_and_matches_a_float_reference():
    """Independent of the fake quantizer: FP8 codes times integer weight codes, scaled, against a float64
    product of the same numbers."""
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(-8, 8, (40, 32), generator=g, dtype=torch.int8)
    w_scale = torch.rand(40, generator=g) + 0.5
    k = Fp8Linear(codes, w_scale, None, fuse=False)
    assert torch.equal(k.w_t.t().float(), codes.float())
    x = torch.randn(24, 32, generator=g) * 4
    scale = torch.tensor(0.02)
    q = (x / scale).clamp(-448, 448).to(FP8).double()
    want = (q * scale.double()) @ (codes.double() * w_scale.double().reshape(-1, 1)).t()
    for dtype in (torch.float32, torch.bfloat16):
        got = k.static(x, scale, torch.tensor(0.0), dtype).double()
        assert rel(got, want) < (1e-6 if dtype == torch.float32 else 4e-3), dtype


def test_int_mm_zero_point_correction_is_exact():
    """uint8 codes with a zero point, shifted onto int8: the subtracted zero-point share equals a float64
    product of the dequantized numbers."""
    g = torch.Generator().manual_seed(10)
    codes = torch.randint(-128, 128, (24, 40), generator=g, dtype=torch.int8)
    w_scale = torch.rand(24, generator=g) * 0.01 + 0.001
    bias = torch.randn(24, generator=g)
    k = IntMMLinear(codes, w_scale, bias, fuse=False, asymmetric=True)
    x = torch.rand(20, 40, generator=g) * 6 - 1
    scale, zero = torch.tensor(7 / 255), torch.tensor(37.0)
    q = ((x / scale).round() + zero).clamp(0, 255).double()
    want = ((q - 37) * scale.double()) @ (codes.double() * w_scale.double().reshape(-1, 1)).t() + bias.double()
    got = k.static(x, scale, zero, torch.float32).double()
    assert rel(got, want) < 1e-6


def test_e4m3_model_layers_route_to_fp8_on_auto():
    ctx = RowGroupContext()
    model = nn.ModuleDict({"a": calibrated(groups=3, w_bits=4, fmt="e4m3", ctx=ctx),
                           "fp": QuantLinear(nn.Linear(64, 8))})
    report = rz.realize(model, rz.RealizeOptions(layout="rows"))
    assert report.backend == "fp8" and list(report.layers) == ["a"] and report.kept_fp == ["fp"]
    assert isinstance(model["a"], rz.RealQuantLinear) and isinstance(model["fp"], QuantLinear)


@pytest.mark.parametrize("backend,fmt", [("int_mm", "int"), ("fp8", "e4m3")])
def test_a_single_input_column_is_computed_right(backend, fmt):
    """An RMS branch is a linear with one input column; torch's CPU _int_mm returns garbage for K = 1, so the
    kernel pads it to two."""
    ctx = RowGroupContext()
    ql = calibrated(groups=3, w_bits=4, ctx=ctx, fmt=fmt, dims=(1, 40))
    idx = groups_index()
    x = layer_input(idx, 11, 1)
    ctx.set(idx)
    with torch.no_grad():
        ref = ql(x)
        real, _ = realized(ql, backend=backend, layout="rows")
        assert real.kernel.k_pad == 1
        assert rel(real(x), ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("backend,w_bits,fmt", [("int_mm", 8, "int"), ("fp8", 4, "e4m3")])
@pytest.mark.parametrize("layout", ["rows", "slices"])
def test_fused_quantization_equals_fake_quant(backend, w_bits, fmt, layout):
    """torch.compile of the int8 / e4m3 quantize steps (one loop; on a GPU a Triton kernel): the same codes as the
    eager passes (slow: it compiles)."""
    ctx = RowGroupContext()
    ql = calibrated(groups=3, w_bits=w_bits, ctx=ctx, fmt=fmt)
    dyn = calibrated(static=False, w_bits=w_bits, ctx=ctx, seed=1, fmt=fmt)
    idx = groups_index()
    x = layer_input(idx, 7)
    ctx.set(idx)
    with torch.no_grad():
        refs = ql(x), dyn(x)
        outs = (realized(ql, backend=backend, fuse=True, layout=layout)[0](x),
                realized(dyn, backend=backend, fuse=True)[0](x))
    assert all(rel(o, r) < 1e-5 for o, r in zip(outs, refs))


@pytest.mark.slow
def test_one_compiled_quantizer_serves_more_variants_than_dynamos_default_limit():
    """Every layer shares one compiled quantize function; a model calls it with float32 and bf16 inputs, a scalar
    scale or one per row, and runs of one row, which the compiler specializes: 12 variants here, more than
    Dynamo's default 8 (the GPU rows of bench/ttft.py stopped on that limit before it was raised)."""
    from fake_quant.int8_kernels import quantizer

    fused, eager = quantizer("fp8", True), quantizer("fp8", False)
    g = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows in (1, 7):
            x = (torch.randn(rows, 32, generator=g) * 10).to(dtype)
            for scale in (torch.tensor(0.05), torch.rand(rows, 1, generator=g) * 0.1 + 0.01):
                assert torch.equal(fused(x, scale).float(), eager(x, scale).float())


@pytest.mark.parametrize("backend,w_bits,fmt", [("int_mm", 8, "int"), ("fp8", 4, "e4m3")])
def test_a_column_major_input_is_made_row_major_first(backend, w_bits, fmt):
    """cuBLASLt multiplies a row-major activation by the column-major weight only; an input with other strides is
    copied to row-major before it is quantized, and the result is the same."""
    ql, x = case_setup("one scale", fmt, w_bits, seed=13)
    x2d = x.reshape(-1, x.shape[-1])
    col = x2d.t().contiguous().t()  # the same values, column-major
    assert col.stride(-1) != 1
    with torch.no_grad():
        ref = ql(x2d)
        real, _ = realized(ql, backend=backend, shape_rules=True)
        seen = []

        class Spy(OpRecorder):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._overloadpacket.__name__ in ("_int_mm", "_scaled_mm"):
                    seen.append(args[0].stride())
                return func(*args, **(kwargs or {}))

        with Spy():
            out = real(col)
    assert seen and all(st[-1] == 1 for st in seen)
    assert rel(out, ref) < 1e-5
