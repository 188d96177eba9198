"""Realization: the calibrated fake-quant linears become int8 kernels that compute the same thing.

After :func:`fake_quant.pipeline.run` every quantized linear holds weights on an integer grid (their
scales in ``weight_scale``) and, with static activations, frozen activation scales. :func:`realize`
replaces each such :class:`~fake_quant.quant_utils.QuantLinear` by a :class:`RealQuantLinear`:

    [online Hadamard, unchanged]  ->  quantize to uint8 with the frozen scale  ->  u8 x s8 int8 GEMM  ->  fp

* static, one scale set: one quantize pass and one kernel call; no statistic of the input is computed;
* static, several scale sets (MSQ, the sink set): the rows of each set are found once per forward from
  the shared :class:`~fake_quant.quant_utils.RowGroupContext`. ``layout="slices"`` (the model reorders
  visual tokens first, AIFS) runs each contiguous run of rows as a view of the input; ``layout="gather"``
  (no AIFS) gathers each set's rows, runs them and scatters the outputs back; ``layout="rows"`` (kernels with
  a row-scale epilogue: ``int_mm``, ``fp8``) looks each row's scale up from its set and runs one call;
  ``layout="auto"`` decides per forward: slices when they are few calls (see :meth:`RowPlan.few_runs`), gather
  otherwise -- so a one-image prompt runs as slices in prompt order, with or without AIFS;
* dynamic per-token (the baseline): row scales from the rows at run time, then the same kernel.

Kernels (``backend``): ``onednn`` and ``fbgemm`` on the CPU (:mod:`fake_quant.int8_kernels`); ``int_mm`` and
``fp8`` on a GPU, or on the CPU to check their numbers (:mod:`fake_quant.scaled_mm`). ``fp8`` needs
activations calibrated on the e4m3 grid (``--a_format e4m3``) and weights of at most 5 bits.

Weights of any width up to 8 bits run on the int8 kernel (4-bit values are int8 codes in [-8, 7]): the
arithmetic is that of the fake-quant model, the memory of int8. Layers that stay in floating point
(``lm_head``, an RMS branch kept in FP, anything not quantized) are left alone.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import cpu_isa
from .config import FP_BITS, QuantConfig
from .int8_kernels import KERNELS, SIGNED_ZERO, Int8Linear, KernelUnavailable, require_ops
from .qparams import Granularity
from .quant_utils import QuantLinear, RowGroupContext
from .scaled_mm import FP8_WEIGHT_CODE_MAX, SCALED_MM_KERNELS, EpilogueLinear, fp8_supported
from .spec import set_module

log = logging.getLogger("mquant")

CPU_BACKENDS = ("onednn", "fbgemm")
BACKENDS = ("auto", *CPU_BACKENDS, *SCALED_MM_KERNELS)
LAYOUTS = ("slices", "gather", "rows", "auto")
AUTO_MAX_RUNS = 8  # layout "auto": up to this many runs of rows are sliced even without a majority pass
FP8_MAX_WEIGHT_BITS = 5  # integer codes up to 16 in magnitude are exact e4m3 numbers
# the rows of the largest scale set run as one call over all rows when the others are at most this
# fraction (their rows are then computed again with their own scale and written over): no output copy
MAJORITY_PASS_FRACTION = 0.125


@dataclass
class RealizeOptions:
    backend: str = "auto"       # "auto": see choose_backend
    fuse: bool = False          # torch.compile the activation quantization into one loop per layer call
    layout: str = "slices"      # rows of several scale sets: "slices" (contiguous, AIFS), "gather", "rows", "auto"
    shape_rules: bool | None = None   # int_mm / fp8: pad to the CUDA kernels' multiples (None: on CUDA only)
    fuse_rotation: bool = True  # static: quantize inside the online Hadamard transform, block by block (see below)
    majority_pass: bool = True  # see MAJORITY_PASS_FRACTION; False: every run of rows is its own call
    reduce_range: bool | None = None  # fbgemm: None = where its int16 pair sums could saturate (no VNNI)
    kernel_quantize: bool = False     # fbgemm: the kernel quantizes its input (exact ties may round the other way)
    share_codes: bool = True    # layers reading the same input on the same grid (q/k/v, gate/up) quantize it once


@dataclass
class RealizeReport:
    backend: str
    isa: str                    # the CPU's int8 / bf16 units, or the GPU's name and compute capability
    layers: dict[str, str] = field(default_factory=dict)  # realized path -> "static xG" / "dynamic"
    kept_fp: list[str] = field(default_factory=list)
    reduce_range: list[str] = field(default_factory=list)
    weight_bits: dict[int, int] = field(default_factory=dict)  # bits -> layers
    int8_weight_bytes: int = 0

    def to_dict(self) -> dict:
        return {"backend": self.backend, "isa": self.isa, "layers": self.layers, "kept_fp": self.kept_fp,
                "reduce_range": self.reduce_range, "weight_bits": self.weight_bits,
                "int8_weight_bytes": self.int8_weight_bytes}


# ---------------------------------------------------------------------------------------------
# which settings a kernel serves (checked on the config, before any work)
# ---------------------------------------------------------------------------------------------
def config_errors(cfg: QuantConfig, backend: str | None = None) -> list[str]:
    """Why ``--real_quant`` cannot run these settings (on ``backend``, once chosen), each message naming the flag
    to change."""
    errs: list[str] = []
    parts = [p for p in cfg.parts() if cfg.part(p.name) is not None or (p.name == "visual" and cfg.connector)]
    if not parts:
        errs.append("--real_quant needs a quantized part (--quant with --quant_llm / --quant_visual_clip)")
    for p in parts:
        w, a = p.weight, p.act
        if a.bits != 8 and a.bits < FP_BITS:
            errs.append(f"--real_quant runs 8-bit activations only, got {p.flag('a_bits')} {a.bits}: no int8 kernel "
                        f"multiplies A{a.bits}; use {p.flag('a_bits')} 8 or drop --real_quant")
        if not a.enabled:
            errs.append(f"--real_quant needs quantized activations ({p.flag('a_bits')} 8): weight-only "
                        f"quantization has no int8 x int8 kernel here")
        if not w.enabled:
            errs.append(f"--real_quant needs quantized weights: set {p.flag('w_bits')} to 8 or less "
                        f"(got {w.bits}, floating point)")
        elif w.bits > 8:
            errs.append(f"--real_quant runs weights of at most 8 bits, got {p.flag('w_bits')} {w.bits}")
        if w.group_size > 0:
            errs.append(f"--real_quant runs per-channel weight scales; {p.flag('w_groupsize')} {w.group_size} "
                        "(group-wise) has no kernel here: drop --w_groupsize")
        if w.enabled and not w.symmetric and w.bits > 7:
            errs.append(f"--real_quant: asymmetric {w.bits}-bit weights (--w_asym) do not fit int8 codes; use "
                        "symmetric weights or at most 7 bits")
        if a.group_size > 0:
            errs.append(f"--real_quant: group-wise activations ({p.flag('a_groupsize')} {a.group_size}) have no "
                        "kernel; use per-tensor static (--" + p.name + "_static) or per-token dynamic activations")
        if not a.static and a.per_tensor:
            errs.append(f"--real_quant: dynamic per-tensor activations ({p.flag('act_per_tensor')}) are not "
                        f"realized; use static scales ({p.flag('static')}) or per-token dynamic ones")
        if not a.static and not a.symmetric:
            errs.append("--real_quant: dynamic activations run symmetric per-token; drop --a_asym or use "
                        f"static scales ({p.flag('static')})")
        if not a.static and a.observer != "minmax":
            errs.append(f"--real_quant: dynamic activations use the min-max rule, not the {a.observer!r} observer")
        if backend is None or not a.enabled:
            continue
        if backend == "fp8":
            if a.format != "e4m3":
                errs.append("--real_quant_backend fp8 multiplies e4m3 activations, and 8-bit integer codes are not "
                            "e4m3 numbers: calibrate them on the FP8 grid (--a_format e4m3) or use int_mm")
            if w.enabled and w.bits > FP8_MAX_WEIGHT_BITS:
                errs.append(f"--real_quant_backend fp8 holds the weight codes in e4m3, exact only up to "
                            f"{FP8_WEIGHT_CODE_MAX}: {p.flag('w_bits')} {w.bits} needs int_mm (or at most "
                            f"{FP8_MAX_WEIGHT_BITS} bits)")
        elif a.format == "e4m3":
            errs.append(f"--a_format e4m3 activations run on the fp8 kernels only, not {backend}: use "
                        "--real_quant_backend fp8 (or auto)")
    return errs


def act_format(cfg: QuantConfig) -> str:
    """The activation grid of the quantized parts ("int" or "e4m3")."""
    formats = {p.act.format for p in cfg.parts() if p.act.enabled and (p.quantize or (p.name == "visual"
                                                                                     and cfg.connector))}
    return "e4m3" if "e4m3" in formats else "int"


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use for the fused quantization, if there is one."""
    import os
    import shutil

    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def choose_backend(name: str = "auto", device: torch.device | str = "cpu", fmt: str = "int") -> str:
    """The kernel family for ``device`` and the activation grid ``fmt`` (``auto``) or the one asked for, after
    checking it can run there. ``auto``: e4m3 activations run on ``fp8``; integer ones on ``int_mm`` on a GPU,
    on oneDNN on a CPU with VNNI or AMX and on fbgemm on other CPUs."""
    if name not in BACKENDS:
        raise ValueError(f"unknown real-quant backend {name!r}; use one of {BACKENDS}")
    device = torch.device(device)
    if name == "auto":
        if fmt == "e4m3":
            name = "fp8"
        elif device.type == "cuda":
            name = "int_mm"
        else:
            isa = cpu_isa.detect()
            name = "onednn" if (isa.vnni or isa.amx) else "fbgemm"
    if name in CPU_BACKENDS:
        if device.type != "cpu":
            raise KernelUnavailable(f"the {name} kernels run on the CPU, the model is on {device}: use "
                                    "--real_quant_backend int_mm (or fp8 with --a_format e4m3) on a GPU")
        require_ops(name)
    elif name == "fp8":
        why = fp8_supported(device)
        if why:
            raise KernelUnavailable(why)
    if device.type == "cpu" and name == "fp8":
        log.warning("fp8 on the CPU runs oneDNN's reference FP8 matmul: right numbers, no speed (a check, not a "
                    "benchmark)")
    if device.type == "cpu" and name == "int_mm" and not (cpu_isa.detect().vnni or cpu_isa.detect().amx):
        log.warning("torch._int_mm on a CPU without VNNI is a scalar loop: right numbers, no speed; fbgemm is "
                    "this CPU's int8 path")
    return name


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}), torch {torch.__version__}"
    return cpu_isa.detect().describe()


# ---------------------------------------------------------------------------------------------
# rows of each scale set, once per forward
# ---------------------------------------------------------------------------------------------
@dataclass
class RowPlan:
    rows: int
    index: torch.Tensor                        # the scale set of each row (for the rows layout)
    runs: list[tuple[int, int, int]]           # (start, stop, scale set) of each maximal run
    members: dict[int, torch.Tensor]           # scale set -> its row indices (for the gather layout)
    counts: dict[int, int]

    @property
    def majority(self) -> int:
        return max(self.counts, key=self.counts.get)

    def majority_pass(self) -> bool:
        """The sets other than the largest cover so few rows that one call over all rows with the largest set's
        scale, plus the other runs redone, beats assembling the output run by run."""
        return self.rows - self.counts[self.majority] <= MAJORITY_PASS_FRACTION * self.rows

    def few_runs(self) -> bool:
        """Slicing costs few kernel calls: a majority pass, or at most AUTO_MAX_RUNS runs."""
        return self.majority_pass() or len(self.runs) <= AUTO_MAX_RUNS


def row_plan(index: torch.Tensor) -> RowPlan:
    idx = index.reshape(-1)
    n = idx.numel()
    cut = (idx[1:] != idx[:-1]).nonzero().flatten().add_(1).tolist()
    starts, stops = [0, *cut], [*cut, n]
    groups = idx[torch.tensor(starts, dtype=torch.long, device=idx.device)].tolist() if n else []
    runs = list(zip(starts, stops, groups))
    counts: dict[int, int] = {}
    for a, b, g in runs:
        counts[g] = counts.get(g, 0) + b - a
    members = {g: (idx == g).nonzero().flatten() for g in counts}
    return RowPlan(rows=n, index=idx.long(), runs=runs, members=members, counts=counts)


class RowPlanner:
    """Shared by the realized layers of one model: the row plan of the context's current index, made
    once per forward (the index object changes with every forward, so identity is the cache key)."""

    def __init__(self, context: RowGroupContext | None) -> None:
        self.context = context
        self._index: torch.Tensor | None = None
        self._plan: RowPlan | None = None

    def plan(self, rows: int) -> RowPlan | None:
        index = None if self.context is None else self.context.index
        if index is None:
            return None
        if index is not self._index:
            self._index, self._plan = index, row_plan(index)
        if self._plan.rows != rows:
            raise ValueError(f"the row-group index has {self._plan.rows} rows but the layer input has {rows}: "
                             "the modality tracking hook did not see this forward's input_ids")
        return self._plan


# ---------------------------------------------------------------------------------------------
# the realized layer
# ---------------------------------------------------------------------------------------------
KERNEL_OUT_DTYPES = (torch.float32, torch.bfloat16)


class SharedCodes:
    """The activation codes of the last layer input, kept for the next layers that read the very same tensor,
    unchanged, on the very same grid: q, k and v (and gate and up) take one input and, calibrated on the same rows,
    the same static scale -- or the same per-token rule -- so one quantization serves all of them. The input is
    held by a weak reference and checked by identity and version counter (a tensor changed in place, or a new
    one, starts afresh); the codes are kept per grid, named by the kernel's code format and the scale and zero
    point (or clip ratio) as numbers. Used by the CPU kernels only, whose scales live in host memory."""

    def __init__(self) -> None:
        self._ref = None
        self._version = -1
        self._codes: dict[tuple, object] = {}
        self.hits = self.misses = 0

    def get(self, x: torch.Tensor, key: tuple, make):
        if x.is_inference():  # no version counter to prove the input unchanged
            return make()
        if self._ref is None or self._ref() is not x or self._version != x._version:
            self._ref, self._version, self._codes = weakref.ref(x), x._version, {}
        if key in self._codes:
            self.hits += 1
            return self._codes[key]
        self.misses += 1
        self._codes[key] = value = make()
        return value


class RealQuantLinear(nn.Module):
    """[online Hadamard] -> uint8 activation codes -> int8 GEMM, equal to the QuantLinear it replaces."""

    def __init__(self, kernel: Int8Linear, online_rotation: nn.Module | None, static: bool,
                 scales: torch.Tensor | None, zeros: torch.Tensor | None, default_group: int, clip: float,
                 planner: RowPlanner | None, layout: str, majority_pass: bool, dtype: torch.dtype) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.kernel = kernel
        self.in_features, self.out_features = kernel.in_features, kernel.out_features
        self.online_rotation = online_rotation
        self.static = static
        self.layout, self.majority_pass = layout, majority_pass
        self.fuse_rotation = True
        self.planner = planner
        self.default_group = default_group
        if layout == "rows" and static and not isinstance(kernel, EpilogueLinear):
            raise ValueError(f"layout 'rows' needs a kernel with a row-scale epilogue (int_mm, fp8), not {kernel.name}")
        # plain attributes, not buffers: model.to(dtype) must not round the scales
        self.scales = None if scales is None else [s.reshape(()).float().clone() for s in scales]
        self.zeros = None if zeros is None else [z.reshape(()).float().clone() for z in zeros]
        # the same as two tables, for the rows layout: each row's scale and zero point looked up by its set
        self.scale_table = None if scales is None else torch.stack(self.scales)
        self.zero_table = None if zeros is None else torch.stack(self.zeros)
        self.clip = torch.tensor(float(clip))
        # callers read ``layer.weight.dtype`` / ``.device`` (patch embeddings cast their input to it) and
        # transformers reads a module's dtype from its first floating-point parameter; the int8 weights live
        # packed in the kernel, so an empty parameter answers them
        self.weight_probe = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
        # the codes of an input another layer has just quantized on the same grid (see SharedCodes)
        self.shared_codes: SharedCodes | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_probe

    @property
    def num_groups(self) -> int:
        return 0 if self.scales is None else len(self.scales)

    def _static(self, x: torch.Tensor, g: int, dtype: torch.dtype) -> torch.Tensor:
        return self.kernel.static(x, self.scales[g], self.zeros[g], dtype)

    def _shares(self) -> bool:
        # the CPU kernels, which quantize and multiply in two halves (the GPU kernels quantize inside their call)
        return self.shared_codes is not None and self.kernel.fuses_input

    def _code_key(self, g: int | None) -> tuple:
        """The grid of the codes: the kernel's code format, and scale set ``g``'s scale and zero point (None: the
        per-token rule's clip ratio)."""
        grid = (type(self.kernel).__name__, getattr(self.kernel, "reduce_range", False))
        if g is None:
            return grid + ("per-token", float(self.clip))
        return grid + (float(self.scales[g]), float(self.zeros[g]))

    def _whole_static(self, x: torch.Tensor, x2d: torch.Tensor, g: int, dtype: torch.dtype) -> torch.Tensor:
        """All rows on scale set ``g``; the codes shared with the layers that read ``x`` on the same grid."""
        if not self._shares():
            return self._static(x2d, g, dtype)
        scale, zero = self.scales[g], self.zeros[g]
        codes = self.shared_codes.get(x, self._code_key(g), lambda: self.kernel.quantize_static(x2d, scale, zero))
        return self.kernel.multiply_static(codes, scale, zero, dtype)

    def _whole_dynamic(self, x: torch.Tensor, x2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self._shares():
            return self.kernel.dynamic(x2d, self.clip, dtype)
        codes, row_scale = self.shared_codes.get(x, self._code_key(None),
                                                 lambda: self.kernel.quantize_dynamic(x2d, self.clip))
        return self.kernel.multiply_dynamic(codes, row_scale, dtype)

    def _plan(self, rows: int) -> RowPlan | None:
        """This forward's row plan when the layer has several scale sets, else None."""
        return self.planner.plan(rows) if self.num_groups > 1 and self.planner is not None else None

    def _whole_group(self, plan: RowPlan | None) -> int | None:
        """The scale set that serves every row (no plan, or a plan of one set), else None."""
        if plan is None:
            return self.default_group if self.num_groups > 1 else 0
        return plan.runs[0][2] if len(plan.counts) == 1 else None

    @staticmethod
    def _out_dtype(x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.dtype in KERNEL_OUT_DTYPES else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_rotation is not None and self.can_quantize_in_rotation():
            out = self.rotate_and_quantize(x, self.online_rotation)
            if out is not None:
                return out[0].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.online_rotation is not None:
            x = self.online_rotation(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        dtype = self._out_dtype(x)
        if not self.static:
            y = self._whole_dynamic(x, x2d, dtype)
        else:
            plan = self._plan(x2d.shape[0])
            whole = self._whole_group(plan)
            if whole is not None:
                y = self._whole_static(x, x2d, whole, dtype)
            elif self.layout == "rows":
                index = plan.index.to(self.scale_table.device)
                y = self.kernel.static_rows(x2d, self.scale_table[index], self.zero_table[index], dtype)
            elif self.layout == "slices" or (self.layout == "auto" and plan.few_runs()):
                y = self._slices(x2d, plan, dtype, x)
            else:
                y = self._gather(x2d, plan, dtype)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def can_quantize_in_rotation(self) -> bool:
        return self.fuse_rotation and self.kernel.fuses_input

    def rotate_and_quantize(self, x: torch.Tensor, rotation: nn.Module,
                            skip: int = 0) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``self(rotation(x)[..., skip:])`` with the quantization inside the rotation: each block of rotated rows
        (whole rows) is quantized while it is in cache, and the rotated rows themselves are never written out
        (only the codes are). Static: one scale for all rows, or a majority pass (the few other rows are kept in
        float from the same transform and redone with their own scale). Dynamic per token: each block's rows get
        their scales from themselves, as they would from the whole input. Returns the 2-D output and the rotated
        first ``skip`` columns in float (an RMS split's branch input), or None where none of these applies (the
        caller rotates, then runs the usual path)."""
        rows = x.numel() // x.shape[-1]
        x2d = x.reshape(rows, x.shape[-1])
        dtype = self._out_dtype(x)
        skipped: list[torch.Tensor] = []

        def split_off(block: torch.Tensor) -> torch.Tensor:  # the first ``skip`` columns stay float, set aside
            if skip:
                skipped.append(block[:, :skip].clone())
                block = block[:, skip:]
            return block

        if not self.static:
            row_scales: list[torch.Tensor] = []

            def quantize_rows(block: torch.Tensor, first: int) -> torch.Tensor:
                codes, row_scale = self.kernel.quantize_dynamic(split_off(block), self.clip)
                row_scales.append(row_scale)
                return codes

            codes = rotation(x2d, epilogue=quantize_rows)
            y = self.kernel.multiply_dynamic(codes, torch.cat(row_scales), dtype)
            return y, (torch.cat(skipped) if skip else None)
        plan = self._plan(rows)
        g = self._whole_group(plan)
        others: list[tuple[int, int, int]] = []
        if g is None:
            if not (self.layout in ("slices", "auto") and self.majority_pass and plan.majority_pass()):
                return None
            g = plan.majority
            others = [r for r in plan.runs if r[2] != g]
        scale, zero = self.scales[g], self.zeros[g]
        kept: dict[int, torch.Tensor] = {}

        def quantize(block: torch.Tensor, first: int) -> torch.Tensor:
            block = split_off(block)
            last = first + block.shape[0]
            for a, b, _ in others:  # keep the rotated rows of the other sets, as floats
                if a < last and b > first:
                    lo, hi = max(a, first), min(b, last)
                    kept[lo] = block[lo - first:hi - first].clone()
            return self.kernel.quantize_static(block, scale, zero)

        codes = rotation(x2d, epilogue=quantize)
        y = self.kernel.multiply_static(codes, scale, zero, dtype)
        for a, b, og in others:
            rotated = torch.cat([kept[lo] for lo in sorted(kept) if a <= lo < b])
            y[a:b] = self._static(rotated, og, dtype)
        return y, (torch.cat(skipped) if skip else None)

    def _slices(self, x2d: torch.Tensor, plan: RowPlan, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
        major = plan.majority
        if self.majority_pass and plan.majority_pass():
            y = self._whole_static(x, x2d, major, dtype)
            for a, b, g in plan.runs:
                if g != major:
                    y[a:b] = self._static(x2d[a:b], g, dtype)
            return y
        y = x2d.new_empty((plan.rows, self.out_features), dtype=dtype)
        for a, b, g in plan.runs:
            y[a:b] = self._static(x2d[a:b], g, dtype)
        return y

    def _gather(self, x2d: torch.Tensor, plan: RowPlan, dtype: torch.dtype) -> torch.Tensor:
        y = x2d.new_empty((plan.rows, self.out_features), dtype=dtype)
        for g, rows in plan.members.items():
            y.index_copy_(0, rows, self._static(x2d.index_select(0, rows), g, dtype))
        return y

    def extra_repr(self) -> str:
        mode = f"static x{self.num_groups} ({self.layout})" if self.static else "dynamic per-token"
        if self.online_rotation is not None and self.can_quantize_in_rotation():
            mode += ", quantized inside the Hadamard transform"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.kernel.name}, {mode}"
                + (", reduce_range" if getattr(self.kernel, "reduce_range", False) else "")
                + (", fused quantize" if self.kernel.fuse else ""))


# ---------------------------------------------------------------------------------------------
# QuantLinear -> RealQuantLinear
# ---------------------------------------------------------------------------------------------
def _is_fp(ql: QuantLinear) -> bool:
    aq, wq = ql.input_quantizer, ql.weight_quantizer
    return ((aq is None or not aq.enabled) and (wq is None or not wq.enabled) and not ql.weight_quantized
            and ql.output_quantizer is None)


def layer_problem(ql: QuantLinear) -> str | None:
    """Why ``ql`` cannot be realized, or None."""
    aq, wq = ql.input_quantizer, ql.weight_quantizer
    if ql.output_quantizer is not None:
        return "it quantizes its output"
    if aq is None or not aq.enabled:
        return "its activations are not quantized (weight-only)"
    if aq.bits != 8:
        return f"its activations have {aq.bits} bits (the kernels take 8)"
    if aq.static:
        if aq.granularity is not Granularity.TENSOR:
            return f"its static activation scales are per {aq.granularity.value}, not per tensor"
        if not aq.is_frozen:
            return "its static activation scales are not calibrated yet"
    elif aq.granularity is not Granularity.ROW or not aq.symmetric or aq.observer_name != "minmax":
        return "its dynamic activations are not symmetric min-max per token"
    if wq is None or not ql.weight_quantized or ql.weight_scale is None:
        return "its weights are not quantized"
    if wq.group_size:
        return f"its weights have group-wise scales (group size {wq.group_size})"
    if wq.bits > 8:
        return f"its weights have {wq.bits} bits"
    return None


def weight_codes(ql: QuantLinear) -> torch.Tensor:
    """int8 codes of the fake-quantized weight: ``weight / scale`` (minus the zero point, which the grid
    already holds), checked to be integers -- a weight off its grid would make the kernel compute
    something else."""
    w = ql.weight.detach().float().cpu()
    scale = ql.weight_scale.float().reshape(-1, 1)
    if scale.shape[0] != w.shape[0]:
        raise ValueError(f"weight scales of shape {tuple(ql.weight_scale.shape)} are not per output channel "
                         f"for a weight of shape {tuple(w.shape)}")
    q = w / scale
    codes = q.round()
    off = float((q - codes).abs().max()) if q.numel() else 0.0
    if off > 0.05:  # fp32 grids are off by ~1e-6, bf16-stored ones by < 0.01 of a step
        raise ValueError(f"the stored weight is not on its quantization grid (off by {off:.3f} of a step)")
    if codes.numel() and (codes.min() < -128 or codes.max() > 127):
        raise ValueError("the weight codes do not fit int8")
    return codes.to(torch.int8)


def realize_layer(ql: QuantLinear, backend: str, opts: RealizeOptions, planner: RowPlanner | None,
                  isa: cpu_isa.CpuIsa, device: torch.device | None = None) -> RealQuantLinear:
    problem = layer_problem(ql)
    if problem is not None:
        raise ValueError(problem)
    aq = ql.input_quantizer
    codes = weight_codes(ql)
    bias = None if ql.bias is None else ql.bias.detach().float().cpu()
    if (backend == "fp8") != aq.bit_type.is_float:
        raise ValueError(f"its activations are on the {aq.bit_type} grid, which the {backend} kernel does not "
                         "take (e4m3 activations run on fp8, integer ones on the others)")
    if backend == "fbgemm":
        reduce = opts.reduce_range
        if reduce is None:  # two codes of a pair at the u8 end times two weights above 64 exceed int16
            reduce = not isa.vnni and int(codes.short().abs().max()) > 64
        if reduce and aq.static and not aq.bit_type.signed:
            raise ValueError("fbgemm without VNNI needs a reduced range for 8-bit weights, which serves symmetric "
                             "activations only: drop --a_asym, or use 4-bit weights")
        kernel = KERNELS["fbgemm"](codes, ql.weight_scale, bias, opts.fuse, reduce_range=reduce,
                                   dynamic=not aq.static, kernel_quantize=opts.kernel_quantize)
    elif backend in SCALED_MM_KERNELS:
        kernel = SCALED_MM_KERNELS[backend](codes, ql.weight_scale, bias, opts.fuse,
                                            device=device or ql.weight.device, shape_rules=opts.shape_rules,
                                            asymmetric=aq.static and not aq.bit_type.signed)
    else:
        kernel = KERNELS[backend](codes, ql.weight_scale, bias, opts.fuse)
    rotation = ql.online_rotation if ql.use_online_rotation else None
    if aq.static:
        zeros = aq.zero_point.reshape(-1) + (SIGNED_ZERO if aq.bit_type.signed and not aq.bit_type.is_float else 0)
        scales = aq.scale.reshape(-1)
    else:
        scales = zeros = None
    real = RealQuantLinear(kernel, rotation, aq.static, scales, zeros,
                           aq.default_row_group or 0, aq.clip_ratio, planner, opts.layout, opts.majority_pass,
                           ql.weight.dtype)
    real.fuse_rotation = opts.fuse_rotation
    return real


def realize(model: nn.Module, opts: RealizeOptions | None = None) -> RealizeReport:
    """Replace every quantized :class:`QuantLinear` of ``model`` (in place); raise, naming the layers, if a
    quantized one cannot be realized. Floating-point layers are left as they are."""
    opts = opts or RealizeOptions()
    if opts.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {opts.layout!r}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    devices = {m.weight.device for _, m in targets}
    if len(devices) > 1:
        raise ValueError(f"the quantized layers are on several devices ({sorted(map(str, devices))}): realize a "
                         "model that sits on one device (not an offloaded one)")
    device = devices.pop() if devices else torch.device("cpu")
    fp8_grid = any(m.input_quantizer is not None and m.input_quantizer.bit_type.is_float for _, m in targets)
    backend = choose_backend(opts.backend, device, "e4m3" if fp8_grid else "int")
    if opts.layout == "rows" and backend not in SCALED_MM_KERNELS:
        raise ValueError(f"layout 'rows' needs a kernel with a row-scale epilogue (int_mm, fp8), not {backend}")
    isa = cpu_isa.detect()
    report = RealizeReport(backend=backend, isa=describe_device(device))
    problems = []
    planners: dict[int, RowPlanner] = {}
    shared = SharedCodes() if opts.share_codes else None
    for name, ql in targets:
        if _is_fp(ql):
            report.kept_fp.append(name)
            continue
        problem = layer_problem(ql)
        if problem is not None:
            problems.append(f"{name}: {problem}")
            continue
        ctx = ql.input_quantizer.context
        planner = planners.setdefault(id(ctx), RowPlanner(ctx))
        try:
            real = realize_layer(ql, backend, opts, planner, isa, device)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        real.shared_codes = shared
        set_module(model, name, real)
        report.layers[name] = f"static x{real.num_groups}" if real.static else "dynamic"
        if getattr(real.kernel, "reduce_range", False):
            report.reduce_range.append(name)
        bits = ql.weight_quantizer.bits
        report.weight_bits[bits] = report.weight_bits.get(bits, 0) + 1
        report.int8_weight_bytes += real.kernel.nbytes()
    if problems:
        raise ValueError(f"{len(problems)} quantized layer(s) cannot run on the {backend} kernels:\n  - "
                         + "\n  - ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else ""))
    if report.reduce_range:
        log.warning("fbgemm on a CPU without VNNI: %d layer(s) with 8-bit weights run their activations on a "
                    "7-bit grid (int16 pair sums would saturate); they differ slightly from the fake-quant model",
                    len(report.reduce_range))
    log.info("realized %d linear layers on %s (%s); %d left in floating point", len(report.layers), backend,
             isa.int8_class if device.type == "cpu" else str(device), len(report.kept_fp))
    return report


__all__ = ["RealizeOptions", "RealizeReport", "RealQuantLinear", "SharedCodes", "realize", "config_errors",
           "choose_backend", "KernelUnavailable", "row_plan", "RowPlanner", "BACKENDS", "act_format",
           "SCALED_MM_KERNELS"]
