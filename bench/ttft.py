"""Prefill time (time to first token) of the realized int8 model against floating point and against dynamic
per-token quantization, all in one run on this machine.

Part ``stack``: random-weight Qwen2-VL language models at real widths (``--widths 2B``: hidden 1536, MLP 8960,
12 heads / 2 KV heads; ``7B``: 3584 / 18944 / 28 / 4) with ``--layers`` decoder layers, prompts of
``--visual`` visual tokens (one image, its features random and 4x wider than the text embeddings) between
text tokens (50 in all), as in the paper's setting. The vision encoder is not run: the image features are
given, so the time is the LLM's prefill. Weights are RTN (the kernels do not care how they were found);
scales are calibrated on two 256-visual-token prompts.

Part ``minivlm``: MiniVLM (DINOv2-S/14 + SmolLM2-135M, real weights, ``make minivlm``) on SynthBench prompts
(image + question), the whole prefill including the vision tower, with GPTQ-free RTN weights calibrated on
the SynthBench calibration files.

Rows: FP32; BF16; then realized int8 models (with their non-GEMM parts in the faster floating-point dtype of
the two, measured here first): W8A8 dynamic per-token, W8A8 static with one scale, MSQ without AIFS (rows
gathered and scattered), MSQ + AIFS (contiguous slices), and W4A8 MQuant (MSQ + AIFS + RMS). Each quantized
row is timed with the activation quantization in eager passes and compiled into one loop (``torch.compile``).
Variants of the same calibrated models, each paired with its main row: dynamic and one scale rotating first and
quantizing in a pass of their own, each layer quantizing its input itself (instead of q/k/v and gate/up sharing
one quantization), on torch's SDPA kernel; dynamic with oneDNN writing bf16 before the row scale; MSQ's runs
sliced in prompt order.
Repeats are interleaved (every setting once per round, the order rotating), and medians are reported; the
ratios compare medians of this run. Peak RSS: the largest resident set sampled during that row's prefills
minus the resident set just before (the prefill's working memory), next to the weights' own bytes.

On a GPU (``--device cuda``, part ``stack``) the rows are the GPU kernels': int8 (``torch._int_mm``) W8A8
dynamic, static one scale, MSQ with its rows gathered, with a scale per row (one call, any order), as AIFS
slices and with AIFS plus a scale per row, W4A8 MQuant; then FP8 (``torch._scaled_mm``, activations
calibrated on the e4m3 grid, W4 weights held in e4m3) dynamic, static one scale, MSQ with a scale per row,
MSQ + AIFS slices and MQuant. The non-GEMM parts run in bf16, every timed prefill ends in a device
synchronize, the memory column is the peak of allocated GPU memory during the prefill, and the per-layer
clocks (in linears / in GEMMs / attention core) are left out: timing them would need a synchronize per layer.
``--kernels gpu`` runs the same rows on the CPU (``torch._scaled_mm`` is a reference loop there: a check of
the rows, not a timing).

Prefill attention (``--attention``, CPU): by default the bf16 rows run the causal prefill attention as blocked
bf16 GEMMs (:mod:`fake_quant.prefill_attention`; torch's SDPA kernel is no faster in bf16 than in float32 and is
then half of the prefill at 4k tokens), FP32 rows keep SDPA, and BF16, W8A8 dynamic and W8A8 one-scale rows on
torch's SDPA kernel are added, so that the attention's own effect is paired within the run. ``--attention sdpa``
runs torch's kernel everywhere (the tables before the blocked attention existed).

    python bench/ttft.py [--part stack|minivlm|all] [--widths 2B] [--layers 2] [--visual 1024,4096]
                         [--repeats 5] [--backend auto|onednn|fbgemm|int_mm|fp8] [--device cpu|cuda]
                         [--kernels cpu|gpu] [--attention blocked|sdpa] [--no_fuse] [--json FILE]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from fake_quant import aifs, cpu_isa, pipeline, prefill_attention  # noqa: E402
from fake_quant.config import QuantConfig  # noqa: E402
from fake_quant.quant_utils import QuantLinear  # noqa: E402
from fake_quant.realize import RealQuantLinear  # noqa: E402

WIDTHS = {"2B": (1536, 8960, 12, 2), "7B": (3584, 18944, 28, 4)}
TEXT_TOKENS = 50
FEATURE_SCALE = 4.0  # visual features 4x wider than text embeddings: a modality gap for MSQ to calibrate


@dataclass
class Setting:
    name: str
    quant: dict | None = None    # None: floating point
    dtype: torch.dtype = torch.float32
    model: torch.nn.Module | None = None
    times: dict[str, list[float]] = field(default_factory=dict)   # mode ("eager" / "fused") -> seconds
    linear_times: dict[str, list[float]] = field(default_factory=dict)
    gemm_times: dict[str, list[float]] = field(default_factory=dict)
    attn_times: dict[str, list[float]] = field(default_factory=dict)
    layout: str | None = None    # the realized MSQ row layout (two settings may share one model)
    fuse_rotation: bool = True   # static: quantize inside the online Hadamard transform (False: rotate, then quantize)
    attention: str | None = None  # None: the run's --attention; "sdpa": torch's kernel (a comparison row)
    dynamic_bf16_gemm: bool = False  # dynamic on oneDNN: the kernel writes bf16 before the row scale (two roundings)
    share_codes: bool = True      # q/k/v and gate/up quantize their common input once (False: each layer itself)
    peak_mem: dict[str, int] = field(default_factory=dict)  # CUDA: peak allocated bytes during the prefill
    rss: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0
    realized_error: float | None = None   # logits, realized vs fake quant
    noise_error: float | None = None      # logits, fake quant vs fake quant under 1e-7 input noise
    layer_error: float | None = None      # worst realized layer vs its fake-quant layer on the same input
    kl: tuple | None = None               # (KL(FP32 || fake quant), KL(FP32 || realized), prompts)


SDPA_ROW = ", torch SDPA attention"
SDPA = {"attention": "sdpa"}  # rows on torch's SDPA kernel: only when the run's attention is the blocked one
# the same model quantizing the rotated input in a pass of its own, as before that fusion
ROTATE_FIRST = {"fuse_rotation": False}
# each of q/k/v (gate/up) quantizing the common input itself
UNSHARED = {"share_codes": False}
# (name, quantization settings, [(row name suffix, MSQ row layout[, Setting fields])]); a setting's rows share one
# calibrated model
QUANT_SETTINGS = [
    ("W8A8 dynamic per-token", dict(w_bits=8, static=False),
     [("", None), (", rotate then quantize", None, ROTATE_FIRST), (", inputs quantized per layer", None, UNSHARED),
      (SDPA_ROW, None, SDPA),
      # a faster, less exact dynamic baseline: the GEMM writes bf16, the row scale is applied to that
      (", bf16 GEMM output", None, {"dynamic_bf16_gemm": True})]),
    ("W8A8 static, one scale", dict(w_bits=8, static=True, msq=False),
     [("", None), (", rotate then quantize", None, ROTATE_FIRST), (", inputs quantized per layer", None, UNSHARED),
      (SDPA_ROW, None, SDPA)]),
    ("W8A8 MSQ, no AIFS", dict(w_bits=8, static=True, msq=True, aifs=False),
     # one image is one contiguous block in prompt order already: the same model with its runs sliced
     [(" (gather)", "gather"), (", runs sliced", "slices")]),
    ("W8A8 MSQ + AIFS (slices)", dict(w_bits=8, static=True, msq=True, aifs=True), [("", "slices")]),
    ("W4A8 MQuant (MSQ + AIFS + RMS)", dict(w_bits=4, static=True, msq=True, aifs=True, rms=True),
     [("", "slices")]),
]
INT8, FP8 = dict(backend="int_mm"), dict(backend="fp8", fmt="e4m3", w_bits=4)
GPU_QUANT_SETTINGS = [
    ("W8A8 dynamic per-token", dict(w_bits=8, static=False, **INT8), [("", None)]),
    ("W8A8 static, one scale", dict(w_bits=8, static=True, msq=False, **INT8), [("", None)]),
    ("W8A8 MSQ, no AIFS", dict(w_bits=8, static=True, msq=True, aifs=False, **INT8),
     [(" (gather)", "gather"), (" (row scales)", "rows")]),
    ("W8A8 MSQ + AIFS", dict(w_bits=8, static=True, msq=True, aifs=True, **INT8),
     [(" (slices)", "slices"), (" (row scales)", "rows")]),
    ("W4A8 MQuant (MSQ + AIFS + RMS)", dict(w_bits=4, static=True, msq=True, aifs=True, rms=True, **INT8),
     [(" (row scales)", "rows")]),
    ("FP8 W4A8 dynamic per-token", dict(static=False, **FP8), [("", None)]),
    ("FP8 W4A8 static, one scale", dict(static=True, msq=False, **FP8), [("", None)]),
    ("FP8 W4A8 MSQ, no AIFS", dict(static=True, msq=True, aifs=False, **FP8), [(" (row scales)", "rows")]),
    ("FP8 W4A8 MSQ + AIFS", dict(static=True, msq=True, aifs=True, **FP8),
     [(" (slices)", "slices"), (" (row scales)", "rows")]),
    ("FP8 W4A8 MQuant (MSQ + AIFS + RMS)", dict(static=True, msq=True, aifs=True, rms=True, **FP8),
     [(" (row scales)", "rows")]),
]


def quant_config(w_bits: int, static: bool, msq: bool = True, aifs: bool = False, rms: bool = False,
                 visual: bool = False, fmt: str = "int", backend: str | None = None) -> QuantConfig:
    q = QuantConfig(nsamples=2, calib_num=2, seed=0, msq=msq, aifs=aifs)
    r = q.rotation
    r.rotate = r.llm = r.online_llm_hadamard = True
    q.rms.llm = rms
    parts = [q.llm] + ([q.visual] if visual else [])
    q.connector = visual
    if visual:
        r.visual = r.online_visual_hadamard = True
        q.rms.visual = rms
    for p in parts:
        p.quantize = True
        p.weight.bits, p.weight.rtn = w_bits, True
        p.act.bits, p.act.static, p.act.format = 8, static, fmt
    return q.validate()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: freed memory stays resident and the deltas read low
        return None


MALLOC_TRIM = _malloc_trim()


class RssPeak:
    """Samples the resident set every few milliseconds while the block runs. Freed heap memory is handed back
    to the system first (``malloc_trim``), so the growth seen is the block's own working memory."""

    def __enter__(self):
        if MALLOC_TRIM is not None:
            MALLOC_TRIM(0)
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


class NoRss:
    base = peak = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def linear_bytes(model: torch.nn.Module, under: str) -> int:
    """Bytes of the linear weights under ``under`` (the decoder layers): floating point, or int8 codes plus
    their fp32 scales and bias once realized."""
    n = 0
    for name, m in model.named_modules():
        if not name.startswith(under):
            continue
        if isinstance(m, RealQuantLinear):
            n += m.kernel.nbytes() + 4 * m.out_features * (2 if m.kernel.bias is not None else 1)
        elif isinstance(m, torch.nn.Linear):
            n += sum(p.numel() * p.element_size() for p in m.parameters())
    return n


class LinearClock:
    """Wall time summed over one forward, inside the decoder layers: in their linear layers (online Hadamard and
    activation quantization included: the part of the prefill the int8 kernels replace), in the int8 GEMM calls
    alone (what is left of the linears if quantizing cost nothing), and in the self-attention modules outside
    their linears (RoPE, SDPA: the attention core)."""

    def __init__(self, model: torch.nn.Module, under: str) -> None:
        from fake_quant.rms import SplitQuantLinear

        kinds = (RealQuantLinear, torch.nn.Linear, SplitQuantLinear)
        self.total = self.gemm = self.attn = self.attn_linears = 0.0
        self._t0 = {}
        self.handles, taken, self._kernels = [], [], []
        for name, m in model.named_modules():
            if not name.startswith(under):
                continue
            if name.endswith("self_attn"):
                self.handles.append(m.register_forward_pre_hook(self._start))
                self.handles.append(m.register_forward_hook(self._stop_attn))
            if not isinstance(m, kinds) or any(name.startswith(t + ".") for t in taken):
                continue
            taken.append(name)
            inside = ".self_attn." in name
            self.handles.append(m.register_forward_pre_hook(self._start))
            self.handles.append(m.register_forward_hook(self._stop_in_attn if inside else self._stop))
        for name, m in model.named_modules():
            if name.startswith(under) and isinstance(m, RealQuantLinear):
                self._time_gemm(m.kernel)
        self.reset()

    def _time_gemm(self, kernel) -> None:
        attr = "matmul" if hasattr(kernel, "matmul") else ("_run" if hasattr(kernel, "_run") else None)
        if attr is None:  # int_mm / fp8: the GEMM is one op inside each call, not timed apart
            return
        fn = getattr(kernel, attr)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.gemm += time.perf_counter() - t0
            return out

        setattr(kernel, attr, timed)
        self._kernels.append((kernel, attr))

    def reset(self) -> None:
        self.total = self.attn = self.attn_linears = 0.0
        self.gemm = 0.0 if self._kernels else float("nan")  # int_mm / fp8: not timed apart

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for kernel, attr in self._kernels:
            delattr(kernel, attr)  # the instance attribute shadowed the method

    def _start(self, module, args):
        self._t0[id(module)] = time.perf_counter()

    def _stop(self, module, args, out):
        self.total += time.perf_counter() - self._t0.pop(id(module))

    def _stop_in_attn(self, module, args, out):
        dt = time.perf_counter() - self._t0.pop(id(module))
        self.total += dt
        self.attn_linears += dt

    def _stop_attn(self, module, args, out):
        self.attn += time.perf_counter() - self._t0.pop(id(module))

    @property
    def attention_core(self) -> float:
        return self.attn - self.attn_linears


def set_fuse(model: torch.nn.Module, fuse: bool) -> None:
    for m in model.modules():
        if isinstance(m, RealQuantLinear):
            m.kernel.set_fuse(fuse)


class NoClock:
    """On a GPU the layer clocks are left out (timing a layer needs a synchronize around it)."""
    total = gemm = attention_core = float("nan")

    def reset(self) -> None:
        pass

    def remove(self) -> None:
        pass


def time_all(settings: list[Setting], inputs: dict, repeats: int, modes: tuple[str, ...], forward,
             layers: str, device: torch.device = torch.device("cpu"), attention: str = "sdpa") -> None:
    """Interleaved: every (setting, mode) once per round, the starting point rotating round by round. Each row's
    prefill attention is its own (``Setting.attention``) or the run's (``attention``)."""
    jobs = [(s, m) for s in settings for m in (modes if s.quant else ("eager",))]
    clocks = {}
    for s in settings:
        if id(s.model) not in clocks:
            clocks[id(s.model)] = LinearClock(s.model, layers) if device.type == "cpu" else NoClock()
    with torch.no_grad():
        for s, m in jobs:  # warm-up: oneDNN primitives, compiled quantizers, allocator
            apply_layout(s)
            set_fuse(s.model, m == "fused")
            prefill_attention.set_mode(s.attention or attention)
            forward(s.model, inputs, s.dtype)
        sync(device)
        for r in range(repeats):
            k = r % len(jobs)
            for s, m in jobs[k:] + jobs[:k]:
                apply_layout(s)
                set_fuse(s.model, m == "fused")
                prefill_attention.set_mode(s.attention or attention)
                gc.collect()
                clock = clocks[id(s.model)]
                clock.reset()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                # on a GPU the host's resident set says nothing and the sampling thread would compete with launches
                with (RssPeak() if device.type == "cpu" else NoRss()) as rss:
                    t0 = time.perf_counter()
                    forward(s.model, inputs, s.dtype)
                    sync(device)
                    dt = time.perf_counter() - t0
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) - before
                    s.peak_mem[m] = max(s.peak_mem.get(m, 0), peak)
                s.times.setdefault(m, []).append(dt)
                s.linear_times.setdefault(m, []).append(clock.total)
                s.gemm_times.setdefault(m, []).append(clock.gemm)
                s.attn_times.setdefault(m, []).append(clock.attention_core)
                s.rss[m] = max(s.rss.get(m, 0), rss.peak - rss.base)
    for c in clocks.values():
        c.remove()
    prefill_attention.set_mode("sdpa")


MODE_LABEL = {"eager": "eager quantize", "fused": "compiled quantize"}


def fp_baseline(settings: list[Setting], attention: str | None = None) -> Setting:
    """The faster floating-point row (median prefill) with the run's attention, or with ``attention``."""
    return min((s for s in settings if not s.quant and s.attention == attention),
               key=lambda s: statistics.median(s.times["eager"]))


def dynamic_of(settings: list[Setting], s: Setting) -> Setting | None:
    """The dynamic per-token row of ``s``'s kernel family and attention (its main row, not a variant)."""
    return next((d for d in settings if d.quant and not d.quant["static"] and d.fuse_rotation
                 and not d.dynamic_bf16_gemm and d.attention == s.attention and d.share_codes == s.share_codes
                 and d.quant.get("backend") == s.quant.get("backend")), None)


def table(settings: list[Setting], title: str, modes: tuple[str, ...]) -> str:
    med = {(s.name, m): statistics.median(v) for s in settings for m, v in s.times.items()}
    base = fp_baseline(settings)

    gpu = any(s.peak_mem for s in settings)
    mem_col = "prefill peak GPU memory MB" if gpu else "prefill peak RSS MB"
    lines = [f"### {title}", "",
             f"baseline: {base.name} (the faster floating-point path here); ratios are speed-ups (higher is faster)",
             "", "| setting | mode | prefill ms | x vs FP32 | x vs " + base.name + " | x vs dynamic | in linears ms "
             f"| linears x vs dynamic | in int8 GEMMs ms | attention core ms | {mem_col} | decoder linears MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lin = {(s.name, m): statistics.median(v) for s in settings for m, v in s.linear_times.items()}
    gemm = {(s.name, m): statistics.median(v) for s in settings for m, v in s.gemm_times.items()}
    attn = {(s.name, m): statistics.median(v) for s in settings for m, v in s.attn_times.items()}
    fp32 = next(s for s in settings if not s.quant and s.dtype == torch.float32)
    def ms(v):
        return "" if v != v else f"{v * 1e3:.0f}"  # NaN: not measured (GPU)

    for s in settings:
        dyn = dynamic_of(settings, s) if s.quant else None
        for m in (modes if s.quant else ("eager",)):
            t = med[s.name, m]
            vs_dyn = f"{med[dyn.name, m] / t:.2f}" if dyn is not None else ""
            mode = MODE_LABEL[m] if s.quant else str(s.dtype).replace("torch.", "")
            lin_dyn = f"{lin[dyn.name, m] / lin[s.name, m]:.2f}" if dyn is not None and not gpu else ""
            mem = s.peak_mem.get(m, 0) if gpu else s.rss[m]
            lines.append(f"| {s.name} | {mode} | {t * 1e3:.1f} | {med[fp32.name, 'eager'] / t:.2f} | "
                         f"{med[base.name, 'eager'] / t:.2f} | {vs_dyn} | {ms(lin[s.name, m])} | {lin_dyn} | "
                         f"{ms(gemm[s.name, m]) if s.quant else ''} | {ms(attn[s.name, m])} | "
                         f"{mem / 2**20:.0f} | {s.weight_bytes / 2**20:.0f} |")
    lines.append("")
    lines.append(f"repeats per row: {len(settings[0].times['eager'])} (interleaved); spread (max/min) of the rows: "
                 + ", ".join(f"{s.name.split(' (')[0]} {max(v) / min(v):.2f}" for s in settings
                             for m, v in s.times.items() if m == "eager"))
    lines += paired_ratios(settings, modes)
    lines += ["", "Realized vs fake quantization on a held-out prompt (fp32, relative): the logits; the fake-quant "
              "model's own logit change when every quantized layer's input is changed by 1e-7 (relative, elementwise: "
              "the float sensitivity of a quantized model, where a code on a rounding boundary flips); the worst realized layer against its fake-quant layer "
              "fed the same input.", "", "| setting | realized vs fake-quant logits | fake-quant vs itself, 1e-7 "
              "input noise | worst layer, same input | KL(FP32 ‖ fake-quant) | KL(FP32 ‖ realized) |",
              "|---|---|---|---|---|---|"]
    for s in settings:
        if s.quant:
            lines.append(f"| {s.name} | {s.realized_error:.1e} | {s.noise_error:.1e} | {s.layer_error:.1e} | "
                         f"{s.kl[0]:.2e} | {s.kl[1]:.2e} |")
    lines.append(f"(KL: next-token distributions of {settings[-1].kl[2]} held-out prompt(s), mean)")
    return "\n".join(lines)


def median_interval(values: list[float], draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """The median and a 95% percentile-bootstrap interval of it (rounds drawn with replacement)."""
    import random

    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return statistics.median(values), meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def paired_ratios(settings: list[Setting], modes: tuple[str, ...]) -> list[str]:
    """Each static row against the one-scale row of its kernel family, round by round: within a round the rows ran
    seconds apart, so the machine's slow drifts cancel in the ratio. Median over rounds and its 95% interval."""
    one: dict = {}
    for s in settings:  # the first one-scale row of each kernel family (its variants are compared with it)
        if s.quant and s.quant["static"] and not s.quant.get("msq", True):
            one.setdefault(s.quant.get("backend"), s)
    rows = [(s, one[s.quant.get("backend")]) for s in settings
            if s.quant and s.quant["static"] and s.quant.get("backend") in one and s is not one[s.quant.get("backend")]]
    rounds = min((len(v) for s in settings for v in s.times.values()), default=0)
    if not one or rounds < 3:
        return []
    def main_of(s: Setting) -> Setting:
        """The row of ``s``'s model with every default: its variants are paired with it."""
        return next(f for f in settings if f.model is s.model and f.layout == s.layout and f.fuse_rotation
                    and f.attention is None and f.share_codes and not f.dynamic_bf16_gemm)

    def variant_pairs(is_variant) -> list[str]:
        out = []
        for s in settings:
            if is_variant(s):
                ref = main_of(s)
                for m in (modes if s.quant else ("eager",)):
                    med, lo, hi = median_interval([a / b for a, b in zip(s.times[m], ref.times[m])])
                    mode = MODE_LABEL[m] if s.quant else str(s.dtype).replace("torch.", "")
                    out.append(f"| {s.name} / {ref.name} | {mode} | {med:.3f} | [{lo:.3f}, {hi:.3f}] |")
        return out

    # each rotate-then-quantize variant against the same model quantizing inside the transform, etc.
    fusion = variant_pairs(lambda s: not s.fuse_rotation)
    attention = variant_pairs(lambda s: s.attention == "sdpa")
    sharing = variant_pairs(lambda s: not s.share_codes)
    lines = ["", f"Paired per-round time ratios against the one-scale row of the same kernels (row / one scale, "
             f"{rounds} rounds; > 1 is slower): median and 95% bootstrap interval of the median.", "",
             "| setting | mode | ratio | 95% interval |", "|---|---|---|---|"] if rows else []
    for s, ref in rows:
        for m in modes:
            if m not in s.times or m not in ref.times:
                continue
            med, lo, hi = median_interval([a / b for a, b in zip(s.times[m], ref.times[m])])
            mode = MODE_LABEL[m]
            lines.append(f"| {s.name} | {mode} | {med:.3f} | [{lo:.3f}, {hi:.3f}] |")
    # the targets' speed-ups of one static scale, paired the same way (> 1: one scale is faster)
    speedups = []
    ones = [s for s in settings if s.quant and s.quant["static"] and not s.quant.get("msq", True) and s.fuse_rotation]
    for ref in ones:
        base = fp_baseline(settings, ref.attention)
        dyn = dynamic_of(settings, ref)
        for m in modes:
            if m not in ref.times:
                continue
            others = [(f"{base.name} / one scale", base.times["eager"])]
            if dyn is not None and m in dyn.times:
                others.append(("dynamic / one scale", dyn.times[m]))
            for d in settings:  # the faster, less exact dynamic variant
                if d.dynamic_bf16_gemm and d.attention == ref.attention and m in d.times and dyn is not None \
                        and d.model is dyn.model:
                    others.append(("dynamic, bf16 GEMM output / one scale", d.times[m]))
            for label, times in others:
                med, lo, hi = median_interval([a / b for a, b in zip(times, ref.times[m])])
                mode = MODE_LABEL[m]
                speedups.append(f"| {ref.name}: {label} | {mode} | {med:.3f} | [{lo:.3f}, {hi:.3f}] |")
    if speedups:
        lines += ["", f"Speed-ups of one static scale, paired per round ({rounds} rounds; > 1: one scale is faster), "
                  "median and 95% bootstrap interval:", "",
                  "| pair | mode | ratio | 95% interval |", "|---|---|---|---|", *speedups]
    if attention:
        lines += ["", "The blocked bf16 prefill attention, paired per round (> 1: torch's SDPA kernel is slower):", "",
                  "| pair | mode | ratio | 95% interval |", "|---|---|---|---|", *attention]
    if fusion:
        lines += ["", "Quantizing inside the online Hadamard transform, paired per round (> 1: rotating first and "
                  "quantizing in a pass of its own is slower):", "",
                  "| pair | mode | ratio | 95% interval |", "|---|---|---|---|", *fusion]
    if sharing:
        lines += ["", "One quantization of the input that q, k and v (gate and up) share, paired per round (> 1: each "
                  "layer quantizing the input itself is slower):", "",
                  "| pair | mode | ratio | 95% interval |", "|---|---|---|---|", *sharing]
    return lines


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------------------------
# part 1: LLM stacks at real widths
# ---------------------------------------------------------------------------------------------
def stack_model(widths: str, layers: int, vocab: int):
    from transformers import Qwen2VLForConditionalGeneration

    from model import tiny

    hidden, ffn, heads, kv = WIDTHS[widths]
    cfg = tiny.qwen2vl_config(
        text={"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
              "max_position_embeddings": 32768, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        vision={"depth": 1, "embed_dim": 32, "hidden_size": hidden, "num_heads": 1}, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    aifs.use_project_attention(model.model.language_model)  # SDPA, or the blocked bf16 prefill attention (--attention)
    return model


class GivenFeatures:
    """Stands in for the vision encoder: seeded random features of the image's token count."""

    def __init__(self, hidden: int) -> None:
        self.hidden, self.cache = hidden, {}  # the same features on every device: made on the CPU, then moved

    def __call__(self, pixel_values, image_grid_thw=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        sizes = (image_grid_thw.prod(-1) // 4).tolist()
        out = []
        for n in sizes:
            key = (n, pixel_values.device, pixel_values.dtype)  # on the device already: no copy inside a timing
            if key not in self.cache:
                g = torch.Generator().manual_seed(n)
                feats = FEATURE_SCALE * torch.randn(n, self.hidden, generator=g) * 0.02
                self.cache[key] = feats.to(pixel_values.device, pixel_values.dtype)
            out.append(self.cache[key])
        return BaseModelOutputWithPooling(pooler_output=tuple(out))


def stack_inputs(nv: int, vocab: int, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    from model import tiny

    side = int(round(nv ** 0.5))
    gh, gw = side, nv // side
    if gh * gw != nv:
        raise SystemExit(f"--visual {nv}: use a count that is a product of two near-equal integers (e.g. 1024, 4096)")
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(300, vocab, (TEXT_TOKENS - 2,), generator=g)
    head, tail = text[:20], text[20:]
    ids = torch.cat([head, torch.tensor([tiny.VISION_START]), torch.full((nv,), tiny.IMAGE_TOKEN),
                     torch.tensor([tiny.VISION_END]), tail])[None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.zeros(1, 1),
             "image_grid_thw": torch.tensor([[1, 2 * gh, 2 * gw]]), "mm_token_type_ids": (ids == tiny.IMAGE_TOKEN).int()}
    return {k: v.to(device) for k, v in batch.items()}


def stack_forward(model, inputs: dict, dtype: torch.dtype):
    batch = {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}
    return model(**batch, use_cache=False, logits_to_keep=1).logits


def kl_from(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """Mean KL(ref || out) of the next-token distributions."""
    return statistics.mean(float(torch.nn.functional.kl_div(o.float().log_softmax(-1), r.float().log_softmax(-1),
                                                            log_target=True, reduction="sum"))
                           for r, o in zip(ref, out))


def build_settings(make_fp, adapter, calib: list[dict], probes: list[dict], forward, backend: str,
                   visual_part: bool = False, only: list[str] | None = None,
                   quant_settings: list | None = None, sdpa_rows: bool = False) -> list[Setting]:
    """FP32 and BF16 models, then each quantized setting: calibrated (fake quant), compared with its realized
    model on ``probes`` (held-out prompts), realized. A setting's own ``backend`` wins over ``backend``.
    ``sdpa_rows``: also the rows that run torch's SDPA kernel instead of the blocked attention."""
    from model.base import Loaded

    probe = probes[0]
    fp32 = make_fp()
    with torch.no_grad():
        fp_logits = [forward(fp32, p, torch.float32) for p in probes]
    settings = [Setting("FP32", None, torch.float32, fp32), Setting("BF16", None, torch.bfloat16,
                                                                    copy.deepcopy(fp32).to(torch.bfloat16))]
    if sdpa_rows:
        settings.append(Setting("BF16" + SDPA_ROW, None, torch.bfloat16, settings[1].model, attention="sdpa"))
    for name, q, variants in quant_settings or QUANT_SETTINGS:
        variants = [v for v in variants if sdpa_rows or (v[2:] or [{}])[0].get("attention") != "sdpa"]
        if only and not any(o.lower() in (name + v[0]).lower() for o in only for v in variants):
            continue
        cfg = quant_config(**q, visual=visual_part)
        loaded = Loaded(copy.deepcopy(fp32), None, "bench")
        logging.getLogger("mquant").info("calibrating %s", name)
        pipeline.run(cfg, adapter, loaded, calib, calib)
        with torch.no_grad():
            fake_logits = [forward(loaded.model, p, torch.float32) for p in probes]
            ref = fake_logits[0]
            noise = rel(with_input_noise(loaded.model, lambda: forward(loaded.model, probe, torch.float32)), ref)
            originals = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
            pipeline.realize(cfg, loaded, q.get("backend", backend))
            for suffix, layout, *fields in variants:
                v = Setting(name + suffix, q, torch.float32, loaded.model, layout=layout,
                            **(fields[0] if fields else {}))
                apply_layout(v)
                v.noise_error = noise
                v.realized_error, v.layer_error = realized_errors(loaded.model, originals,
                                                                  lambda: forward(loaded.model, probe, torch.float32),
                                                                  ref)
                v.kl = (kl_from(fp_logits, fake_logits),
                        kl_from(fp_logits, [forward(loaded.model, p, torch.float32) for p in probes]), len(probes))
                settings.append(v)
    return settings


def with_input_noise(model: torch.nn.Module, run, size: float = 1e-7):
    """``run()`` with every quantized layer's input multiplied by ``1 + size * N(0, 1)`` (elementwise): how far
    float-rounding-sized changes -- the kind a different summation order makes -- move this model by themselves
    (a quantized model is discontinuous: a code on a rounding boundary flips)."""
    g = torch.Generator().manual_seed(0)

    def perturb(module, args):
        x = args[0]
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)  # the same draw on every device
        return (x * (1 + size * noise), *args[1:])

    hooks = [m.register_forward_pre_hook(perturb) for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        return run()
    finally:
        for h in hooks:
            h.remove()


def realized_errors(model, originals: dict, run, ref: torch.Tensor) -> tuple[float, float]:
    """Relative logit error of the realized model against the fake-quant logits ``ref``, and the worst relative
    error of a realized layer against its fake-quant layer on the very same input."""
    worst = [0.0]

    def compare(name):
        def hook(module, args, out):
            worst[0] = max(worst[0], rel(out, originals[name](args[0])))
        return hook

    hooks = [m.register_forward_hook(compare(n)) for n, m in model.named_modules() if isinstance(m, RealQuantLinear)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return rel(out, ref), worst[0]


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, keeping the centring vectors of the rotation's float32 norms in float32 (their
    forward computes in float32 and does not cast the buffer back)."""
    from fake_quant.rotation_utils import RMSNorm

    model.to(dtype)
    for m in model.modules():
        if isinstance(m, RMSNorm) and m.center is not None:
            m.center = m.center.float()


def apply_layout(s: Setting) -> None:
    for m in s.model.modules():
        if isinstance(m, RealQuantLinear):
            if s.layout is not None:
                m.layout = s.layout
            m.fuse_rotation = s.fuse_rotation
            if not hasattr(m, "bench_shared_codes"):  # the model's own cache, kept to switch it back on
                m.bench_shared_codes = m.shared_codes
            m.shared_codes = m.bench_shared_codes if s.share_codes else None
            if hasattr(m.kernel, "dynamic_gemm_out_dtype"):
                m.kernel.dynamic_gemm_out_dtype = s.dynamic_bf16_gemm


def choose_fp_dtype(settings: list[Setting], inputs: dict, forward,
                    device: torch.device = torch.device("cpu")) -> tuple[torch.dtype, str]:
    """bf16 for the non-GEMM parts only if this machine runs the bf16 model faster than fp32 (measured now)."""
    t = {}
    with torch.no_grad():
        for s in settings[:2]:
            forward(s.model, inputs, s.dtype)
            sync(device)
            t0 = time.perf_counter()
            forward(s.model, inputs, s.dtype)
            sync(device)
            t[s.dtype] = time.perf_counter() - t0
    faster = min(t, key=t.get)
    why = (f"probe prefill: fp32 {t[torch.float32] * 1e3:.0f} ms, bf16 {t[torch.bfloat16] * 1e3:.0f} ms -> the "
           f"realized models run their non-GEMM parts in {str(faster).replace('torch.', '')}")
    return faster, why


def attention_check(settings: list[Setting], inputs: dict, forward, attention: str) -> str:
    """How far the blocked attention moves the BF16 model's logits, next to how far bf16 itself is from float32."""
    if attention != "blocked":
        return ""
    fp32, bf16 = settings[0], settings[1]
    with torch.no_grad():
        ref = forward(fp32.model, inputs, torch.float32).float()
        sdpa = forward(bf16.model, inputs, torch.bfloat16).float()
        with prefill_attention.use("blocked"):
            blocked = forward(bf16.model, inputs, torch.bfloat16).float()
    return (f"\nlast-token logits of this prompt, relative: BF16 vs FP32 {rel(sdpa, ref):.1e} (torch's SDPA kernel), "
            f"{rel(blocked, ref):.1e} (blocked attention); blocked vs SDPA in bf16 {rel(blocked, sdpa):.1e}")


def part_stack(args, modes) -> list[str]:
    from model.qwen2vl import Qwen2VLAdapter

    hidden = WIDTHS[args.widths][0]
    adapter = Qwen2VLAdapter()

    device = torch.device(args.device)

    def make_fp():
        m = stack_model(args.widths, args.layers, args.vocab).to(device)
        m.model.get_image_features = GivenFeatures(hidden)
        return m

    calib = [stack_inputs(256, args.vocab, seed=s, device=device) for s in (1, 2)]
    probes = [stack_inputs(256, args.vocab, seed=s, device=device) for s in (3, 4, 5)]
    settings = build_settings(make_fp, adapter, calib, probes, stack_forward, args.backend, only=args.settings,
                              sdpa_rows=args.attention == "blocked",
                              quant_settings=GPU_QUANT_SETTINGS if args.kernels == "gpu" else QUANT_SETTINGS)
    out = []
    for nv in args.visual:
        inputs = stack_inputs(nv, args.vocab, device=device)
        with prefill_attention.use(args.attention):
            dtype, why = choose_fp_dtype(settings, inputs, stack_forward, device)
        for s in settings:
            if s.quant:
                cast_model(s.model, dtype)
                s.dtype = dtype
            s.times, s.linear_times, s.rss, s.peak_mem = {}, {}, {}, {}
            s.weight_bytes = linear_bytes(s.model, "model.language_model.layers")
        time_all(settings, inputs, args.repeats, modes, stack_forward, "model.language_model.layers", device,
                 args.attention)
        title = (f"Qwen2-VL-{args.widths} widths, {args.layers} random decoder layers, {nv} visual + {TEXT_TOKENS} "
                 f"text tokens, vocabulary {args.vocab}")
        out.append(table(settings, title, modes) + "\n\n" + why
                   + attention_check(settings, inputs, stack_forward, args.attention))
        print(out[-1] + "\n", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# part 2: MiniVLM on SynthBench prompts
# ---------------------------------------------------------------------------------------------
def part_minivlm(args, modes) -> list[str]:
    from evaluation import datasets, synthbench
    from model.base import Sample
    from model.registry import get

    adapter = get("llava")
    data = os.path.join(ROOT, "evaluation", "synthbench_data")
    calib_rows = [r for s in synthbench.SUBSETS for r in datasets.load_rows(data, f"{s}_calib")][::20][:8]
    eval_rows = [datasets.load_rows(data, s)[0] for s in synthbench.SUBSETS]

    base = adapter.load("minivlm", "cpu", torch.float32)
    llm_blocks = next(st for st in adapter.stacks(base.model) if st.name == "llm").blocks

    def batch(r):
        return adapter.build_inputs(base, Sample([datasets.image_of(r)], r["question"]), "cpu")

    calib = [batch(r) for r in calib_rows]
    probes = [batch(r) for r in eval_rows]

    def forward(model, inputs, dtype):
        b = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        return model(**b, use_cache=False, logits_to_keep=1).logits

    aifs.use_project_attention(base.model.get_submodule(llm_blocks.rsplit(".", 1)[0]))
    settings = build_settings(lambda: base.model, adapter, calib, probes, forward, args.backend, visual_part=True,
                              sdpa_rows=args.attention == "blocked",
                              only=args.settings)
    out = []
    for r in eval_rows[:1]:
        inputs = batch(r)
        n_vis = int(adapter.visual_token_mask(base, inputs).sum())
        with prefill_attention.use(args.attention):
            dtype, why = choose_fp_dtype(settings, inputs, forward)
        for s in settings:
            if s.quant:
                cast_model(s.model, dtype)
                s.dtype = dtype
            s.weight_bytes = linear_bytes(s.model, llm_blocks)
        time_all(settings, inputs, args.repeats, modes, forward, llm_blocks, attention=args.attention)
        title = (f"MiniVLM (DINOv2-S/14 + SmolLM2-135M, real weights), SynthBench prompt {r['index']}: "
                 f"{inputs['input_ids'].shape[1]} LLM tokens ({n_vis} visual), vision tower included")
        out.append(table(settings, title, modes) + "\n\n" + why + attention_check(settings, inputs, forward,
                                                                                  args.attention))
        print(out[-1] + "\n", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="stack", choices=["stack", "minivlm", "all"])
    ap.add_argument("--widths", default="2B", choices=sorted(WIDTHS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--visual", default="1024,4096", help="visual token counts, comma-separated")
    ap.add_argument("--vocab", type=int, default=16384, help="vocabulary of the random stacks (only the last "
                    "token's logits are computed, so it changes little)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="auto", choices=["auto", "onednn", "fbgemm", "int_mm", "fp8"],
                    help="kernels of the CPU rows (the GPU rows name their own: int_mm and fp8)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda[:N] (default: cuda when available); the minivlm part runs on the CPU")
    ap.add_argument("--kernels", default=None, choices=["cpu", "gpu"],
                    help="which rows: the CPU kernels' (oneDNN / fbgemm) or the GPU kernels' (int_mm, fp8); "
                         "default: those of --device")
    ap.add_argument("--no_fuse", action="store_true", help="skip the compiled-quantize timings")
    ap.add_argument("--attention", default="blocked", choices=list(prefill_attention.MODES),
                    help="prefill attention of every row: 'blocked' (default: the bf16 rows on a CPU use "
                         "fake_quant.prefill_attention, and BF16, dynamic and one-scale rows on torch's SDPA kernel "
                         "are added for comparison) or 'sdpa' (torch's kernel everywhere)")
    ap.add_argument("--json", default=None, help="also write the tables and the machine to this file")
    ap.add_argument("--settings", default=None, help="only the quantized settings whose names contain one of these "
                    "comma-separated words (case-insensitive), e.g. 'one scale,AIFS'; FP32 and BF16 always run")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    args.kernels = args.kernels or ("gpu" if device.type == "cuda" else "cpu")
    if device.type != "cpu":
        args.attention = "sdpa"  # the blocked attention is a CPU path
    if args.kernels == "cpu" and device.type != "cpu":
        ap.error("--kernels cpu: oneDNN and fbgemm run on the CPU; use --device cpu")
    if device.type != "cpu" and args.part != "stack":
        ap.error(f"--part {args.part}: the GPU timings cover the random stacks only (--part stack)")
    table_rows = GPU_QUANT_SETTINGS if args.kernels == "gpu" else QUANT_SETTINGS
    names = [n + v[0] for n, _, variants in table_rows for v in variants]
    args.settings = [w.strip() for w in args.settings.split(",") if w.strip()] if args.settings else None
    if args.settings and not any(any(w.lower() in n.lower() for w in args.settings) for n in names):
        ap.error(f"--settings {','.join(args.settings)}: matches none of {names}")
    args.visual = [int(v) for v in args.visual.split(",")]
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    modes = ("eager",) if args.no_fuse else ("eager", "fused")
    isa = cpu_isa.detect()
    from fake_quant.realize import choose_backend

    head = [f"machine: {isa.describe()}; {os.cpu_count()} cores, {torch.get_num_threads()} threads",
            f"build: {cpu_isa.torch_build()}"]
    if device.type == "cuda":
        from fake_quant.realize import describe_device

        head.append(f"GPU: {describe_device(device)}; rows on torch._int_mm (int8) and torch._scaled_mm (FP8)")
    elif args.kernels == "gpu":
        head.append("GPU kernels' rows run on the CPU here: torch._int_mm / torch._scaled_mm (a check of the rows; "
                    "the FP8 matmul is a reference loop on a CPU, so its times mean nothing)")
    else:
        backend = choose_backend(args.backend)
        head.append(f"int8 backend: {backend} ({'asked for' if args.backend != 'auto' else 'chosen for ' + isa.int8_class})")
    if args.attention == "blocked":
        head.append("prefill attention: blocked bf16 GEMMs (fake_quant.prefill_attention) in the bf16 rows, torch's "
                    "SDPA kernel in float32 and in the rows named so")
    else:
        head.append("prefill attention: torch's SDPA kernel")
    head.append(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("\n".join(head) + "\n", flush=True)
    tables = []
    if args.part in ("stack", "all"):
        tables += part_stack(args, modes)
    if args.part in ("minivlm", "all"):
        tables += part_minivlm(args, modes)
    tail = f"load average at end: {os.getloadavg()[0]:.2f}"
    print(tail)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"head": head, "tables": tables, "tail": tail, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
