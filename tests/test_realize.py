"""Real int8 execution, layer by layer: a realized linear computes what its fake-quant QuantLinear computes, on
every int8 backend of this machine; static scales never look at the input; the kernel follows the CPU."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fake_quant import cpu_isa, realize as rz
from fake_quant.hadamard_utils import OnlineHadamard
from fake_quant.int8_kernels import KernelUnavailable, require_ops
from fake_quant.modality import TEXT, VISUAL
from fake_quant.quant_utils import ActQuantizer, QuantLinear, RowGroupContext, WeightQuantizer

SINK = 2


def backends():
    out = []
    for name in ("onednn", "fbgemm"):
        try:
            require_ops(name)
            out.append(name)
        except KernelUnavailable:
            pass
    return out


BACKENDS = backends()


def rel(a, b):
    return float((a - b).norm() / b.norm())


def groups_index(batch=2, seq=40, visual=(6, 30), contiguous=True):
    """Row groups of a prompt: a sink token, text, one visual block (or visual rows interleaved with text)."""
    idx = torch.full((batch, seq), TEXT)
    if contiguous:
        idx[:, visual[0]:visual[1]] = VISUAL
    else:
        idx[:, visual[0]:visual[1]:2] = VISUAL
    idx[:, 0] = SINK
    return idx


def layer_input(idx, seed, width=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*idx.shape, width, generator=g)
    x[idx == VISUAL] *= 20.0   # visual rows: a wider range, so a shared scale would be a different model
    x[idx == SINK] *= 200.0    # the attention sink dwarfs everything
    return x


def calibrated(static=True, w_bits=8, groups=3, a_sym=True, rotation=False, bias=True, ctx=None, seed=0,
               fmt="int", dims=(64, 48)):
    torch.manual_seed(seed)
    lin = nn.Linear(*dims, bias=bias)
    aq = ActQuantizer(8, a_sym, "tensor" if static else "token", static=static,
                      num_row_groups=groups if static else 1, default_row_group=TEXT, context=ctx, fmt=fmt)
    ql = QuantLinear(lin, online_rotation=OnlineHadamard(dims[0]) if rotation else None, input_quantizer=aq,
                     weight_quantizer=WeightQuantizer(w_bits))
    ql.quantize_weight_()
    if static:
        idx = groups_index()
        if ctx is not None:
            ctx.set(idx)
        aq.start_calibration()
        with torch.no_grad():
            ql(layer_input(idx, 100, dims[0]))
        aq.freeze()
    return ql


def realized(ql, **opts):
    holder = nn.Sequential(ql)
    report = rz.realize(holder, rz.RealizeOptions(**opts))
    return holder[0], report


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", ["one scale", "msq+sink slices", "msq+sink gather", "interleaved slices",
                                  "asym activations", "dynamic", "rotation"])
def test_realized_layer_equals_fake_quant(backend, w_bits, case):
    ctx = RowGroupContext()
    static = case != "dynamic"
    groups = 1 if case in ("one scale", "dynamic") else 3
    ql = calibrated(static, w_bits, groups, a_sym=case != "asym activations", rotation=case == "rotation", ctx=ctx)
    idx = groups_index(contiguous=case != "interleaved slices")
    x = layer_input(idx, 1)
    ctx.set(idx)
    with torch.no_grad():
        ref = ql(x)
        layout = "gather" if "gather" in case else "slices"
        real, report = realized(ql, backend=backend, layout=layout)
        out = real(x)
    assert isinstance(real, rz.RealQuantLinear) and report.backend == backend
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel(out, ref) < 1e-5  # measured ~1.5e-7: only the float accumulation order differs


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_slice_strategy_gives_the_same_rows(backend):
    """One call over all rows with the largest set's scale plus the few other rows redone, a call per run of
    rows, and gather/scatter: the same numbers, for a mostly-visual prompt (where the first applies)."""
    ctx = RowGroupContext()
    ql = calibrated(ctx=ctx)
    idx = groups_index(seq=64, visual=(2, 62))
    x = layer_input(idx, 2)
    ctx.set(idx)
    with torch.no_grad():
        ref = ql(x)
        real, _ = realized(ql, backend=backend)
        outs = {}
        for layout, majority in (("slices", True), ("slices", False), ("gather", True), ("auto", True)):
            real.layout, real.majority_pass = layout, majority
            outs[layout, majority] = real(x)
    plan = rz.row_plan(idx)
    assert plan.rows - plan.counts[plan.majority] <= rz.MAJORITY_PASS_FRACTION * plan.rows  # the first applies
    for out in outs.values():
        assert rel(out, ref) < 1e-5


def test_negative_controls_wrong_scale_or_wrong_rows_are_caught():
    ctx = RowGroupContext()
    ql = calibrated(ctx=ctx)
    idx = groups_index()
    x = layer_input(idx, 3)
    ctx.set(idx)
    with torch.no_grad():
        ref = ql(x)
        real, _ = realized(ql)
        assert rel(real(x), ref) < 1e-5
        good = list(real.scales)
        real.scales = [s * 1.5 for s in good]         # a wrong activation scale
        assert rel(real(x), ref) > 1e-2
        real.scales = [good[VISUAL], good[TEXT], good[SINK]]  # text rows on the visual scale and back
        assert rel(real(x), ref) > 1e-2
        real.scales = good
        ctx.set(torch.zeros_like(idx))                # every row told it is text
        assert rel(real(x), ref) > 1e-2


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


REDUCTIONS = {"amax", "amin", "aminmax", "max", "min", "sum", "mean", "var", "std", "norm", "linalg_vector_norm",
              "topk", "sort", "kthvalue", "median", "quantile", "argmax", "argmin", "logsumexp", "prod"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["slices", "gather"])
def test_static_path_computes_no_statistic_of_its_input(backend, layout):
    ctx = RowGroupContext()
    one = calibrated(groups=1, rotation=True, ctx=ctx)
    msq = calibrated(groups=3, rotation=True, ctx=ctx, seed=1)
    dyn = calibrated(static=False, rotation=True, ctx=ctx, seed=2)
    idx = groups_index()
    x = layer_input(idx, 4)
    ctx.set(idx)
    layers = {name: realized(ql, backend=backend, layout=layout)[0] for name, ql in
              (("one", one), ("msq", msq), ("dynamic", dyn))}
    seen = {}
    with torch.no_grad():
        for name, layer in layers.items():
            with OpRecorder() as rec:
                layer(x)
            seen[name] = set(rec.ops)
    assert not seen["one"] & REDUCTIONS and not seen["msq"] & REDUCTIONS, seen
    assert "amax" in seen["dynamic"]  # the recorder does see a row statistic where there is one
    kernel_op = "qlinear_pointwise" if backend == "onednn" else "linear_with_input_q_dq_qweight_dq_output_fp32"
    assert all(kernel_op in ops for ops in seen.values())


@pytest.mark.skipif("fbgemm" not in BACKENDS, reason="this torch build has no fbgemm")
def test_fbgemm_reduced_range_is_the_seven_bit_grid():
    """Without VNNI fbgemm's int16 pair sums could saturate for 8-bit weights; the reduced range (forced here,
    where VNNI exists) is exactly a 7-bit activation grid at twice the scale."""
    ctx = RowGroupContext()
    ql = calibrated(groups=1, ctx=ctx)
    x = layer_input(groups_index(), 5)
    scale = ql.input_quantizer.scale.clone()
    with torch.no_grad():
        real, report = realized(ql, backend="fbgemm", reduce_range=True)
        out = real(x)
        seven = ActQuantizer(7, True, "tensor", static=True)
        seven.scale, seven.zero_point = 2 * scale, torch.zeros_like(scale)
        ql.input_quantizer = seven
        ref = ql(x)
    assert report.reduce_range == ["0"]
    assert rel(out, ref) < 1e-5


def _isa(vnni, amx=False):
    return cpu_isa.CpuIsa(model="test", capability="AVX2", vnni=vnni, amx=amx, avx512_bf16=False)


@pytest.mark.skipif(BACKENDS != ["onednn", "fbgemm"], reason="needs both backends in this torch build")
def test_the_kernel_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(cpu_isa, "detect", lambda: _isa(vnni=True, amx=True))
    assert rz.choose_backend() == "onednn"
    monkeypatch.setattr(cpu_isa, "detect", lambda: _isa(vnni=True))
    assert rz.choose_backend() == "onednn"
    monkeypatch.setattr(cpu_isa, "detect", lambda: _isa(vnni=False))
    assert rz.choose_backend() == "fbgemm"
    # without VNNI 8-bit weights get the reduced range, 4-bit ones (|code| <= 8) cannot saturate and do not
    ctx = RowGroupContext()
    w8, w4 = calibrated(w_bits=8, groups=1, ctx=ctx), calibrated(w_bits=4, groups=1, ctx=ctx)
    holder = nn.Sequential(w8, w4)
    report = rz.realize(holder, rz.RealizeOptions())
    assert report.backend == "fbgemm" and report.reduce_range == ["0"]
    assert report.weight_bits == {8: 1, 4: 1}


def test_a_build_without_the_ops_names_the_missing_op(monkeypatch):
    class NoOps:
        pass

    monkeypatch.setattr(torch.ops, "onednn", NoOps())
    with pytest.raises(KernelUnavailable, match=r"torch\.ops\.onednn\.qlinear_prepack is missing"):
        rz.choose_backend("onednn")


def test_layers_no_kernel_serves_are_named_and_fp_layers_kept():
    ctx = RowGroupContext()
    a4 = QuantLinear(nn.Linear(64, 8), input_quantizer=ActQuantizer(4, True, "token"), weight_quantizer=WeightQuantizer(4))
    a4.quantize_weight_()
    grouped = QuantLinear(nn.Linear(64, 8), input_quantizer=ActQuantizer(8, True, "token"),
                          weight_quantizer=WeightQuantizer(4, group_size=16))
    grouped.quantize_weight_()
    uncalibrated = QuantLinear(nn.Linear(64, 8), input_quantizer=ActQuantizer(8, True, "tensor", static=True),
                               weight_quantizer=WeightQuantizer(8))
    uncalibrated.quantize_weight_()
    model = nn.ModuleDict({"a4": a4, "grouped": grouped, "cold": uncalibrated, "fp": QuantLinear(nn.Linear(64, 8)),
                           "ok": calibrated(groups=1, ctx=ctx)})
    with pytest.raises(ValueError) as e:
        rz.realize(model)
    msg = str(e.value)
    assert "3 quantized layer(s)" in msg and "a4: its activations have 4 bits" in msg
    assert "grouped: its weights have group-wise scales" in msg and "cold: its static activation scales are not calibrated" in msg
    model = nn.ModuleDict({"fp": QuantLinear(nn.Linear(64, 8)), "ok": calibrated(groups=1, ctx=ctx)})
    report = rz.realize(model)
    assert report.kept_fp == ["fp"] and list(report.layers) == ["ok"] and isinstance(model["fp"], QuantLinear)


def test_a_weight_off_its_grid_is_refused():
    ql = calibrated(groups=1)
    with torch.no_grad():
        ql.weight.add_(0.3 * ql.weight_scale.reshape(-1, 1))  # a third of a step off: not the model that was calibrated
    with pytest.raises(ValueError, match="not on its quantization grid"):
        realized(ql)


def test_bf16_activations_give_bf16_outputs_close_to_fp32():
    ctx = RowGroupContext()
    ql = calibrated(groups=3, ctx=ctx)
    idx = groups_index()
    x = layer_input(idx, 6)
    ctx.set(idx)
    with torch.no_grad():
        ref = ql(x)
        real, _ = realized(ql)
        out = real(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), ref) < 1e-2  # bf16 input rounding moves a few codes; the rest is exact


class ThreeReaders(nn.Module):
    """q, k and v of one input (their forward reads the very same tensor), and a fourth layer of another input."""

    def __init__(self, layers):
        super().__init__()
        self.q, self.k, self.v, self.o = layers

    def forward(self, x):
        y = self.q(x) + self.k(x) + self.v(x)
        return y, self.o(y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["one scale", "msq+sink majority", "dynamic"])
def test_layers_reading_one_input_share_its_codes(backend, case):
    """q / k / v calibrated on the same rows have the same static scales (or the same per-token rule): the input is
    quantized once for all three, with outputs bit-identical to quantizing it three times; a layer whose scale
    differs, an input changed in place, or another input, gets its own codes."""
    import copy

    ctx = RowGroupContext()
    static = case != "dynamic"
    groups = 3 if "msq" in case else 1
    idx = groups_index(seq=64, visual=(2, 62))  # mostly visual: MSQ's majority pass over all rows
    layers = [calibrated(static, groups=groups, ctx=ctx, seed=s, dims=(64, 64)) for s in range(4)]
    if static:  # the same calibration rows -> the same scales, as in a model
        for ql in layers[1:3]:
            ql.input_quantizer.load_state_dict(layers[0].input_quantizer.state_dict())
    x = layer_input(idx, 5)
    ctx.set(idx)
    with torch.no_grad():
        ref = ThreeReaders(copy.deepcopy(layers))(x)
        shared = ThreeReaders(copy.deepcopy(layers))
        rz.realize(shared, rz.RealizeOptions(backend=backend))
        apart = ThreeReaders(copy.deepcopy(layers))
        rz.realize(apart, rz.RealizeOptions(backend=backend, share_codes=False))
        out, out_apart = shared(x), apart(x)
        cache = shared.q.shared_codes
        assert apart.q.shared_codes is None
        assert (cache.hits, cache.misses) == (2, 2)  # k and v reuse q's codes; o reads another tensor
        assert all(torch.equal(a, b) for a, b in zip(out, out_apart))
        assert all(rel(a, b) < 1e-5 for a, b in zip(out, ref))
        assert torch.equal(shared(x)[0], apart(x)[0]) and (cache.hits, cache.misses) == (4, 4)
        shared.q(x)
        x.mul_(1.5)  # changed in place between q and k: its version moves, k quantizes it afresh
        assert torch.equal(shared.k(x), apart.k(x)) and (cache.hits, cache.misses) == (4, 6)
    if static:  # k calibrated on other rows: its own codes (q's would be a different model), v still shares q's
        layers[1].input_quantizer.scale.mul_(1.25)
        with torch.no_grad():
            ref = ThreeReaders(copy.deepcopy(layers))(x)
            shared = ThreeReaders(copy.deepcopy(layers))
            rz.realize(shared, rz.RealizeOptions(backend=backend))
            out = shared(x)
        assert (shared.q.shared_codes.hits, shared.q.shared_codes.misses) == (1, 3)
        assert all(rel(a, b) < 1e-5 for a, b in zip(out, ref))


@pytest.mark.skipif("onednn" not in BACKENDS, reason="this torch build has no oneDNN int8 ops")
def test_dynamic_rows_with_the_gemm_writing_bf16():
    """oneDNN dynamic rows: the kernel writes float32 by default (one rounding after the row scale, as the static
    path); ``dynamic_gemm_out_dtype`` lets it write bf16 before the row scale -- a second rounding, nothing more."""
    ql = calibrated(static=False, seed=3)
    x = layer_input(groups_index(), 9)
    with torch.no_grad():
        xb = x.bfloat16()
        exact = ql(xb.float())                      # the fake-quant layer on the same bf16 inputs, in float32
        real, _ = realized(ql, backend="onednn")
        once = real(xb)
        real.kernel.dynamic_gemm_out_dtype = True
        twice = real(xb)
    assert once.dtype == twice.dtype == torch.bfloat16
    def ulp(t):  # one bf16 step at each value
        return torch.ldexp(torch.ones_like(t), torch.frexp(t).exponent - 8)

    product = exact - ql.bias        # what the kernel writes before the bias is added
    assert ((once.float() - exact).abs() <= ulp(exact) / 2 + 1e-6).all()  # rounded once: half a step
    # rounded twice: the kernel's bf16 output (the product before the row scale and the bias, relative error at
    # most 2^-8), then half a step of the result
    assert ((twice.float() - exact).abs() <= product.abs() * 2.0 ** -8 + ulp(exact) / 2 + 1e-6).all()
    assert not torch.equal(once, twice)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_quantization_equals_fake_quant(backend):
    """torch.compile of the quantize step (one loop): the same codes as the eager passes (slow: it compiles)."""
    ctx = RowGroupContext()
    ql = calibrated(groups=3, ctx=ctx)
    dyn = calibrated(static=False, ctx=ctx, seed=1)
    idx = groups_index()
    x = layer_input(idx, 7)
    ctx.set(idx)
    with torch.no_grad():
        refs = ql(x), dyn(x)
        outs = realized(ql, backend=backend, fuse=True)[0](x), realized(dyn, backend=backend, fuse=True)[0](x)
    assert all(rel(o, r) < 1e-5 for o, r in zip(outs, refs))


@pytest.mark.skipif("fbgemm" not in BACKENDS, reason="this torch build has no fbgemm")
def test_fbgemm_kernel_quantize_differs_only_at_exact_ties():
    """fbgemm's own input quantization (reciprocal scale, fused multiply-add) may round a value exactly halfway
    between two codes the other way; elsewhere it is the fake quantizer. Off by default for that reason."""
    ql = calibrated(groups=1)
    scale = ql.input_quantizer.scale[0]
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(-100, 100, (64, 64), generator=g).float()
    x_tie = (codes + 0.5) * scale                          # every input on a tie
    x_off = (codes + 0.1 + 0.8 * torch.rand(64, 64, generator=g)) * scale  # almost surely none on a tie
    with torch.no_grad():
        fast, _ = realized(ql, backend="fbgemm", kernel_quantize=True)
        assert rel(fast(x_off), ql(x_off)) < 1e-5
        step = (ql.weight.abs().sum(dim=1) * scale).max()  # what moving every code by one can change per output
        diff = (fast(x_tie) - ql(x_tie)).abs()
        assert diff.max() > 0 and bool((diff <= step * 1.001).all())


def test_auto_layout_slices_few_runs_and_gathers_many():
    """``auto``: a prompt with few runs of rows (one image) is sliced in prompt order; one where a large minority is
    cut into many short runs (text interleaved row by row) is gathered -- the same rows either way."""
    few = rz.row_plan(groups_index(batch=1)[0])
    assert few.few_runs() and len(few.runs) == 4  # sink, text, visual, text
    many = rz.row_plan(groups_index(batch=1, contiguous=False)[0])
    assert not many.majority_pass() and len(many.runs) > rz.AUTO_MAX_RUNS and not many.few_runs()
    if not BACKENDS:
        return
    ctx = RowGroupContext()
    ql = calibrated(ctx=ctx)
    with torch.no_grad():
        for contiguous in (True, False):
            idx = groups_index(contiguous=contiguous)
            x = layer_input(idx, 9)
            ctx.set(idx)
            ref = ql(x)
            real, _ = realized(ql, layout="auto")
            calls = []
            real._slices = lambda *a, f=real._slices: calls.append("slices") or f(*a)
            real._gather = lambda *a, f=real._gather: calls.append("gather") or f(*a)
            assert rel(real(x), ref) < 1e-5
            assert calls == ["slices" if contiguous else "gather"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("case", ["one scale", "majority pass across blocks", "sink set only", "dynamic"])
def test_quantizing_inside_the_hadamard_transform_equals_fake_quant(backend, w_bits, case, monkeypatch):
    """The codes are made block by block inside the online Hadamard transform (blocks of 7 rows here, so runs of the
    other scale sets straddle block edges and the batch edge; per-token scales come from each block's own whole
    rows); the same numbers as rotating first and as the fake-quant layer."""
    from fake_quant import hadamard_utils

    monkeypatch.setattr(hadamard_utils, "ROW_BLOCK_ELEMENTS", 64 * 7)
    ctx = RowGroupContext()
    groups = 1 if case in ("one scale", "dynamic") else 3
    ql = calibrated(static=case != "dynamic", groups=groups, w_bits=w_bits, rotation=True, ctx=ctx)
    idx = groups_index(seq=64, visual=(2, 62))  # per prompt: the sink, one text row, 60 visual rows, two text rows
    if case == "sink set only":
        idx = torch.full_like(idx, SINK)
    x = layer_input(idx, 14)
    ctx.set(idx)
    epilogues = []
    with torch.no_grad():
        ref = ql(x)
        real, _ = realized(ql, backend=backend)
        forward = real.online_rotation.forward

        def spy(t, epilogue=None):
            epilogues.append(epilogue is not None)
            return forward(t, epilogue=epilogue)

        real.online_rotation.forward = spy
        fused = real(x)
        assert "quantized inside the Hadamard transform" in repr(real)
        real.fuse_rotation = False
        unfused = real(x)
    assert epilogues == [True, False]  # the fused path ran, then the rotate-first one
    assert rel(fused, ref) < 1e-5 and rel(fused, unfused) < 1e-6


def test_quantizing_inside_the_transform_is_not_used_where_it_does_not_apply():
    """An even mix of scale sets has no majority pass (each set's rows would need their own pass): it rotates
    first."""
    ctx = RowGroupContext()
    msq = calibrated(groups=3, rotation=True, ctx=ctx, seed=1)
    idx = groups_index()  # 24 visual rows of 40: no majority pass
    x = layer_input(idx, 15)
    ctx.set(idx)
    with torch.no_grad():
        for ql in (msq,):
            ref = ql(x)
            real, _ = realized(ql)
            seen = []
            forward = real.online_rotation.forward
            real.online_rotation.forward = lambda t, epilogue=None: seen.append(epilogue) or forward(t, epilogue)
            assert rel(real(x), ref) < 1e-5
            assert seen == [None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_split_quantizes_inside_the_transform_too(backend, monkeypatch):
    """An RMS-split layer (Hadamard -> channel 0 to a small branch, the rest to the main linear): realized with a
    static scale, the main part's codes are made inside the transform and the branch gets the rotated channel 0 in
    float; the same as the fake-quant split layer, with the majority pass and runs straddling blocks."""
    from fake_quant import hadamard_utils
    from fake_quant.rms import SplitQuantLinear

    monkeypatch.setattr(hadamard_utils, "ROW_BLOCK_ELEMENTS", 64 * 7)
    torch.manual_seed(3)
    folded = QuantLinear(nn.Linear(64, 48), online_rotation=OnlineHadamard(64))
    split = SplitQuantLinear(folded)
    ctx = RowGroupContext()
    for part, groups in ((split.main, 3), (split.branch, 3)):
        part.input_quantizer = ActQuantizer(8, True, "tensor", static=True, num_row_groups=groups,
                                            default_row_group=TEXT, context=ctx)
        part.weight_quantizer = WeightQuantizer(4)
        part.quantize_weight_()
    idx = groups_index(seq=64, visual=(2, 62))
    ctx.set(idx)
    for part in (split.main, split.branch):
        part.input_quantizer.start_calibration()
    with torch.no_grad():
        split(layer_input(idx, 100))
    for part in (split.main, split.branch):
        part.input_quantizer.freeze()
    x = layer_input(idx, 16)
    holder = nn.Sequential(split)
    calls = []
    with torch.no_grad():
        ref = split(x)
        rz.realize(holder, rz.RealizeOptions(backend=backend, layout="auto"))
        assert isinstance(split.main, rz.RealQuantLinear) and split.main.can_quantize_in_rotation()
        fused_call = split.main.rotate_and_quantize
        split.main.rotate_and_quantize = lambda *a, **k: calls.append(k.get("skip")) or fused_call(*a, **k)
        out = split(x)
    assert calls == [1]
    assert rel(out, ref) < 1e-5
