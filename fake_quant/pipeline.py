"""The quantization pipeline: one code path for every model family, driven by an adapter.

    fuse norms / LayerNorm -> RMSNorm  ->  rotate  ->  wrap linears in QuantLinear
    ->  weights (GPTQ or RTN), segment by segment, block by block
    ->  static activation calibration  ->  freeze

Weights are quantized in the order the model runs: each segment's inputs (vision blocks, connector,
LLM layers) are captured once from a full forward of the model whose earlier segments are already
quantized, and propagated block by block through the quantized blocks, so every layer is
calibrated on what it will see. Inside a block, linears that read the same tensor form one group
(q/k/v, gate/up ...) and groups are quantized in execution order.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import rotation_utils as ru
from .config import PartConfig, QuantConfig
from . import aifs
from .gptq import GPTQ
from .modality import TEXT, VISUAL, ModalityState, install_tracking, row_groups  # noqa: F401  (TEXT/VISUAL re-exported)
from .offload import Offloader
from .quant_utils import ActQuantizer, PatchConvLinear, QuantLinear, RowGroupContext, WeightQuantizer
from .spec import get, set_module

log = logging.getLogger("mquant")


@dataclass
class PipelineReport:
    seconds: dict[str, float] = field(default_factory=dict)
    rotation: dict = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)   # per quantized linear: method, error
    static_quantizers: int = 0
    analysis_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "rotation": self.rotation, "layers": self.layers,
                "static_quantizers": self.static_quantizers, "analysis_files": self.analysis_files}


class _Stop(Exception):
    pass


class Stage:
    """Times a pipeline stage and logs one line for it."""

    def __init__(self, report: PipelineReport, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        log.info("stage %s ...", self.name)
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.report.seconds[self.name] = self.report.seconds.get(self.name, 0.0) + dt
        if exc[0] is None:
            log.info("stage %s done in %.2f s", self.name, dt)
        return False


# ---------------------------------------------------------------------------------------------
# rotation and wrapping
# ---------------------------------------------------------------------------------------------
def rotate_model(model: nn.Module, stacks, cfg: QuantConfig, sites=()) -> dict:
    """Rotate the stacks the config names; with ``--rotate_visual_cross_attn`` also give each connector
    attention in ``sites`` (:class:`~fake_quant.spec.AttentionSite`) its per-head V/O Hadamard."""
    r = cfg.rotation
    options = {}
    rms = dict(split_threshold=cfg.rms.threshold, keep_fp=cfg.rms.keep_fp)
    if r.rotate and r.visual:
        options["visual"] = ru.RotationOptions(mode=r.mode, seed=cfg.seed, online_hadamard=r.online_visual_hadamard,
                                               online_inputs=r.online_visual_input_hadamard,
                                               fp32_had=r.fp32_had, fallback=r.hadamard_fallback,
                                               split=cfg.rms.visual, **rms)
    if r.rotate and r.llm:
        options["llm"] = ru.RotationOptions(mode=r.mode, seed=cfg.seed + 1, online_hadamard=r.online_llm_hadamard,
                                            online_inputs=r.online_llm_input_hadamard,
                                            fp32_had=r.fp32_had, fallback=r.hadamard_fallback,
                                            split=cfg.rms.llm, **rms)
    report = ru.rotate(model, stacks, options)
    if r.rotate and r.visual_cross_attn:
        for site in sites:
            ru.rotate_ov_at(model, site.path, site.attn)
        report["connector"] = {"rotate_ov": [site.path for site in sites]}
        if sites:
            log.info("connector: per-head V/O Hadamard in %s", ", ".join(site.path for site in sites))
        else:
            log.info("--rotate_visual_cross_attn: this connector has no attention; it is rotated together with "
                     "the streams it bridges")
    return report


def _act_quantizer(part: PartConfig, context: RowGroupContext | None, row_groups: int = 1) -> ActQuantizer | None:
    a = part.act
    if not a.enabled:
        return None
    if a.static:
        gran, gs = "tensor", None
    elif a.group_size > 0:
        gran, gs = "group", a.group_size
    else:
        gran, gs = ("tensor" if a.per_tensor else "token"), None
    return ActQuantizer(a.bits, a.symmetric, gran, group_size=gs, static=a.static, observer=a.observer,
                        clip_ratio=a.clip_ratio, context=context, num_row_groups=row_groups if a.static else 1,
                        default_row_group=TEXT, fmt=a.format)


def _weight_quantizer(part: PartConfig, in_features: int | None = None) -> WeightQuantizer | None:
    """The part's weight quantizer for a layer with ``in_features`` inputs. A group size that does not
    divide them (a patch embedding's 3*14*14 = 588, an RMS branch's single column) falls back to per
    channel for that layer; :func:`wrap_linears` reports which layers did."""
    w = part.weight
    if not w.enabled:
        return None
    gs = w.group_size if w.group_size > 0 else None
    if gs is not None and in_features is not None and in_features % gs:
        gs = None
    # a one-column weight (an RMS branch) is exact on the absmax / qmax grid: every value is its row's absmax,
    # which the full-range grid would round to -8 or 7 steps of absmax / 7.5 (6.7% off)
    full_range = w.full_range and in_features != 1
    return WeightQuantizer(bits=w.bits, symmetric=w.symmetric, group_size=gs, mse=w.clip, full_range=full_range)


def linears_in(model: nn.Module, path: str, skip: tuple[str, ...]) -> dict[str, nn.Module]:
    """Linear / QuantLinear submodules of ``path`` by full path, minus skipped names."""
    root = get(model, path)
    out = {}
    for name, m in root.named_modules():
        full = f"{path}.{name}" if name else path
        if isinstance(m, (nn.Linear, QuantLinear)) and not any(s and s in full for s in skip):
            out[full] = m
    return out


def wrap_linears(model: nn.Module, segments, cfg: QuantConfig, context: RowGroupContext | None) -> dict[str, QuantLinear]:
    """Replace every linear of each quantized part by a QuantLinear with that part's quantizers."""
    wrapped: dict[str, QuantLinear] = {}
    per_channel: list[str] = []
    for seg in segments:
        part = cfg.part(seg.part)
        if part is None:
            continue
        for mod_path in seg.modules:
            convert_patch_convs(model, mod_path, cfg.skip_names)
            for path, lin in linears_in(model, mod_path, cfg.skip_names).items():
                if getattr(lin, "keep_fp", False):  # an RMS branch kept in floating point
                    continue
                ql = lin if isinstance(lin, QuantLinear) else QuantLinear(lin)
                ql.weight_quantizer = _weight_quantizer(part, ql.in_features)
                if part.weight.enabled and part.weight.group_size > 0 and ql.weight_quantizer.group_size is None:
                    per_channel.append(f"{path} ({ql.in_features} inputs)")
                groups = row_groups(cfg.msq, cfg.sink_scale) if seg.part == "llm" else 1
                ql.input_quantizer = _act_quantizer(part, context, row_groups=groups)
                ql.part = seg.part
                if ql is not lin:
                    set_module(model, path, ql)
                wrapped[path] = ql
    if per_channel:
        log.warning("weight group size does not divide the inputs of %d layer(s); quantized per output channel "
                    "instead: %s", len(per_channel), ", ".join(per_channel[:8]) + (" ..." if len(per_channel) > 8 else ""))
    return wrapped


def convert_patch_convs(model: nn.Module, path: str, skip: tuple[str, ...]) -> list[str]:
    """Replace patch convolutions under ``path`` by :class:`PatchConvLinear` (a linear over patches)."""
    root = get(model, path)
    done = []
    for name, m in list(root.named_modules()):
        full = f"{path}.{name}" if name else path
        if PatchConvLinear.convertible(m) and not any(s and s in full for s in skip):
            set_module(model, full, PatchConvLinear(m))
            done.append(full)
    return done


def set_act_quantizers(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = enabled


# ---------------------------------------------------------------------------------------------
# weights, segment by segment
# ---------------------------------------------------------------------------------------------
def capture_inputs(model: nn.Module, module_path: str, batches: list[dict], forward: Callable[[dict], Any]) -> list[tuple]:
    """(args, kwargs) with which ``module_path`` is called, for each batch (the forward stops there)."""
    store: list[tuple] = []

    def hook(mod, args, kwargs):
        store.append((tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}))
        raise _Stop

    h = get(model, module_path).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                forward(b)
            except _Stop:
                pass
    finally:
        h.remove()
    if len(store) != len(batches):
        raise RuntimeError(f"{module_path} was not reached by {len(batches) - len(store)} calibration batches")
    return store


def _detach(v):
    return v.detach() if isinstance(v, torch.Tensor) else v


def _run(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: hidden}


def _trace(module: nn.Module, qlinears: dict[str, QuantLinear], args, kwargs) -> list[tuple[str, torch.Tensor]]:
    """(name, input) of every linear call of one forward of ``module``, in order."""
    # the input tensors themselves are kept (not their id()): a freed tensor's id can be reused by
    # a later, unrelated one, which would merge layers that do not share an input
    order: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name, ql in qlinears.items():
        hooks.append(ql.register_forward_pre_hook(lambda m, a, n=name: order.append((n, a[0]))))
    try:
        with torch.no_grad():
            _run(module, args, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return order


def _groups_from_trace(order: list[tuple[str, torch.Tensor]], qlinears) -> list[list[str]]:
    groups: list[list[str]] = []
    seen = set()
    last_input = None
    for name, inp in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and inp is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    groups += [[n] for n in qlinears if n not in seen]  # never called on these inputs: quantize last
    return groups


def execution_groups(module: nn.Module, qlinears: dict[str, QuantLinear], args, kwargs) -> list[list[str]]:
    """Linears in the order they run; consecutive ones reading the same tensor form one group."""
    return _groups_from_trace(_trace(module, qlinears, args, kwargs), qlinears)


def _share_key(ql: QuantLinear):
    """Linears of one execution group read the same tensor; those with no online transform (or the same
    one) also see the same input after it, so one Hessian serves them all."""
    return id(ql.online_rotation) if ql.use_online_rotation and ql.online_rotation is not None else None


def _collect_hessians(groups: list[list[str]], qlinears, module, inputs, cfg: QuantConfig,
                      called_once: set[str] = frozenset()) -> dict[str, GPTQ]:
    """One pass of the block over ``inputs`` feeding one Hessian per group of linears sharing an input.
    When every feeding linear runs once per forward (``called_once``), the pass stops right after the last
    of them: the rest of the block is not needed for these Hessians."""
    collectors: dict[str, GPTQ] = {}
    feeding: list[tuple[str, QuantLinear, GPTQ]] = []
    for names in groups:
        shared: dict = {}
        for n in names:
            ql = qlinears[n]
            if ql.weight_quantizer is None or _is_rtn(ql, cfg):
                continue
            key = _share_key(ql)
            if key not in shared:
                shared[key] = GPTQ(ql.in_features, device=ql.weight.device)
                feeding.append((n, ql, shared[key]))
            collectors[n] = shared[key]
    stop = bool(feeding) and all(n in called_once for n, _, _ in feeding)
    for i, (_, ql, g) in enumerate(feeding):
        ql.capture = _stopping(g.add_batch) if stop and i == len(feeding) - 1 else g.add_batch
    try:
        if collectors:
            with torch.no_grad():
                for args, kwargs in inputs:
                    try:
                        _run(module, args, kwargs)
                    except _Stop:
                        pass
    finally:
        for _, ql, _ in feeding:
            ql.capture = None
    return collectors


def _stopping(feed: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    def capture(x: torch.Tensor) -> None:
        feed(x)
        raise _Stop

    return capture


def _quantize_collected(names: list[str], qlinears, collectors: dict[str, GPTQ], cfg: QuantConfig,
                        report: PipelineReport) -> None:
    """Quantize ``names``: GPTQ for those with a Hessian (stacked where they share it and their weight
    quantizers agree), RTN for the rest."""
    batches: dict[tuple, list[str]] = {}
    for n in names:
        ql = qlinears[n]
        if ql.weight_quantizer is None:
            continue
        if n not in collectors:
            ql.quantize_weight_()
            report.layers[n] = {"method": "rtn"}
            continue
        key = (id(collectors[n]), repr(ql.weight_quantizer), ql.weight.dtype, ql.weight.device)
        batches.setdefault(key, []).append(n)
    for members in batches.values():
        g = collectors[members[0]]
        results = g.quantize_many([qlinears[n].weight for n in members], qlinears[members[0]].weight_quantizer,
                                  blocksize=cfg.gptq.blocksize, percdamp=cfg.gptq.percdamp,
                                  act_order=cfg.gptq.act_order, static_groups=cfg.gptq.static_groups,
                                  refit_rounds=cfg.gptq.refit_rounds)
        for n, res in zip(members, results):
            qlinears[n].set_quantized_weight_(res.weight, res.qparams)
            report.layers[n] = {"method": "gptq", "output_mse": res.output_mse, "seconds": res.seconds}
    for n in names:
        if n in collectors:
            collectors[n].free()


def _is_rtn(ql: QuantLinear, cfg: QuantConfig) -> bool:
    part = cfg.part(getattr(ql, "part", "llm"))
    return bool(part and part.weight.rtn)


def quantize_weights(model: nn.Module, segments, cfg: QuantConfig, batches: list[dict],
                     forward: Callable[[dict], Any], report: PipelineReport, offloader=None) -> None:
    for seg in segments:
        part = cfg.part(seg.part)
        if part is None or not part.weight.enabled:
            continue
        with Stage(report, f"weights:{seg.part}"):
            inputs = capture_inputs(model, seg.modules[0], batches, forward)
            bar = tqdm(seg.modules, desc=f"{'RTN' if part.weight.rtn else 'GPTQ'} {seg.part}", unit="block",
                       leave=False, disable=None)
            for path in bar:
                with (offloader.pin(path) if offloader is not None else nullcontext()):
                    inputs = _quantize_block(model, path, inputs, cfg, report)
            del inputs


def _quantize_block(model: nn.Module, path: str, inputs: list[tuple], cfg: QuantConfig,
                    report: PipelineReport) -> list[tuple]:
    """Quantize one block's weights; return its outputs as the next block's inputs."""
    module = get(model, path)
    qlinears = {n: m for n, m in linears_in(model, path, cfg.skip_names).items()
                if isinstance(m, QuantLinear) and not m.weight_quantized}
    wqs = {n: m.weight_quantizer for n, m in qlinears.items()}
    # while a block is worked on, layers not yet done run with their FP weights (no on-the-fly
    # quantization); a group's inputs come from the already-quantized groups before it
    for q in wqs.values():
        if q is not None:
            q.enabled = False
    try:
        if qlinears:
            order = _trace(module, qlinears, *inputs[0])
            groups = _groups_from_trace(order, qlinears)
            calls = Counter(n for n, _ in order)
            once = {n for n, c in calls.items() if c == 1}
            if cfg.gptq.true_sequential:  # each group's Hessian sees the groups before it quantized
                for names in groups:
                    collectors = _collect_hessians([names], qlinears, module, inputs, cfg, once)
                    _quantize_collected(names, qlinears, collectors, cfg, report)
            else:  # every Hessian from one pass with the block's FP weights
                collectors = _collect_hessians(groups, qlinears, module, inputs, cfg, once)
                _quantize_collected([n for names in groups for n in names], qlinears, collectors, cfg, report)
    finally:
        for q in wqs.values():
            if q is not None:
                q.enabled = True
    with torch.no_grad():
        return [_with_hidden(a, k, _run(module, a, k)) for a, k in inputs]


# ---------------------------------------------------------------------------------------------
# static activation calibration
# ---------------------------------------------------------------------------------------------
def calibrate_static(model: nn.Module, batches: list[dict], forward: Callable[[dict], Any],
                     before_forward: Callable[[dict], None] | None = None) -> int:
    static = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.static and m.enabled]
    if not static:
        return 0
    for q in static:
        q.start_calibration()
    with torch.no_grad():
        for b in tqdm(batches, desc="static calibration", unit="sample", leave=False, disable=None):
            if before_forward is not None:
                before_forward(b)
            forward(b)
    for q in static:
        q.freeze()
    return len(static)


# ---------------------------------------------------------------------------------------------
# the whole pipeline
# ---------------------------------------------------------------------------------------------
def rebuild(cfg: QuantConfig, adapter, loaded, report: PipelineReport | None = None) -> dict[str, QuantLinear]:
    """The deterministic structural stages (rotation, wrapping, modality tracking, AIFS): enough to
    load saved tensors into."""
    report = report or PipelineReport()
    model = loaded.model
    stacks = adapter.stacks(model)
    if cfg.rotation.rotate:
        with Stage(report, "rotate"), torch.no_grad():
            report.rotation = rotate_model(model, stacks, cfg, adapter.attention_sites(model))
    context = RowGroupContext()
    wrapped: dict[str, QuantLinear] = {}
    if cfg.any_quantized:
        with Stage(report, "wrap"):
            wrapped = wrap_linears(model, adapter.segments(model), cfg, context)
            log.info("wrapped %d linear layers", len(wrapped))
    grouped = any(q.input_quantizer is not None and q.input_quantizer.num_row_groups > 1 for q in wrapped.values())
    if grouped or cfg.aifs:
        state = ModalityState(context, msq=cfg.msq, sink=cfg.sink_scale and grouped)
        install_tracking(loaded, adapter, state)
        if grouped and cfg.msq:
            log.info("MSQ: LLM activations keep separate static scales for text and visual tokens")
        if state.sink:
            log.info("sink scale: the first token of each sequence keeps its own static LLM scales")
        if cfg.aifs:
            llm = next(s for s in stacks if s.name == "llm")
            aifs.install(get(model, llm.root), state)
            log.info("AIFS: visual tokens first at prefill, attention unchanged")
    return wrapped


def use_project_attention(adapter, loaded) -> None:
    """Run the language model's transformers attention through the project's implementation (SDPA, with AIFS's
    original-order prefill and the blocked bf16 prefill attention of :mod:`fake_quant.prefill_attention` where
    those are on). The project's own decoders call it already."""
    for stack in adapter.stacks(loaded.model):
        if stack.name == "llm":
            aifs.use_project_attention(get(loaded.model, stack.root))


def realize(cfg: QuantConfig, loaded, backend: str = "auto", fuse: bool = False,
            report: PipelineReport | None = None, layout: str = "auto"):
    """Run the calibrated model's quantized linears on integer or FP8 kernels (:mod:`fake_quant.realize`).
    ``layout="auto"``: kernels with a row-scale epilogue (int_mm, fp8) run every row in one call with its own
    scale; the CPU kernels slice the runs of rows of each MSQ scale set when that is a few calls (always with AIFS;
    without it, for prompts like one image among text) and gather them otherwise."""
    from .realize import SCALED_MM_KERNELS, RealizeOptions, act_format, choose_backend, realize as realize_model

    device = next(loaded.model.parameters()).device
    backend = choose_backend(backend, device, act_format(cfg))
    if layout == "auto":
        layout = "rows" if backend in SCALED_MM_KERNELS else "auto"
    opts = RealizeOptions(backend=backend, fuse=fuse, layout=layout)
    with Stage(report or PipelineReport(), "realize"):
        return realize_model(loaded.model, opts)


def offload(adapter, loaded, device: str) -> Offloader:
    """Keep the transformer blocks of ``loaded.model`` on the CPU, streaming each to ``device``
    while it runs (see :mod:`fake_quant.offload`); the rest of the model moves to ``device``."""
    model = loaded.model
    blocks = [p for s in adapter.stacks(model) for p in s.block_paths(model)]
    loaded.offloader = Offloader(model, blocks, device)
    log.info("offload: %d blocks stay on the CPU and visit %s one at a time", len(blocks), device)
    return loaded.offloader


def analyze(loaded, adapter, batches: list[dict], report: PipelineReport, out_dir: str) -> list[str]:
    """Write the analysis figures/tables of the rotated FP model (all quantizers off)."""
    from . import analysis

    model = loaded.model
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    saved = [(m.weight_quantizer, m.weight_quantizer.enabled) for m in qls if m.weight_quantizer is not None]
    for q, _ in saved:
        q.enabled = False
    set_act_quantizers(model, False)
    try:
        act = analysis.activation_ranges(loaded, adapter, batches)
    finally:
        for q, on in saved:
            q.enabled = on
        set_act_quantizers(model, True)
    online = [p for part in report.rotation.values() for p in part.get("online_hadamard", [])]
    files = analysis.write(out_dir, act, analysis.rms_weights(model, online))
    log.info("analysis: wrote %d files to %s", len(files), out_dir)
    return files


def run(cfg: QuantConfig, adapter, loaded, gptq_batches: list[dict], static_batches: list[dict],
        report: PipelineReport | None = None, after_weights: Callable[[], None] | None = None,
        offload_device: str | None = None, analysis_dir: str | None = None) -> PipelineReport:
    """Rotate and quantize ``loaded.model`` in place. Batches are model-input dicts (on the compute
    device). ``after_weights`` runs once the weights are quantized (e.g. to checkpoint them).
    ``offload_device``: the model sits on the CPU and blocks visit this device one at a time."""
    cfg.validate()
    report = report or PipelineReport()
    model = loaded.model

    def forward(batch: dict):
        return model(**batch, use_cache=False)

    rebuild(cfg, adapter, loaded, report)
    offloader = offload(adapter, loaded, offload_device) if offload_device is not None else None
    if analysis_dir is not None:
        with Stage(report, "analysis"):
            report.analysis_files = analyze(loaded, adapter, static_batches or gptq_batches, report, analysis_dir)
    if not cfg.any_quantized:
        return report
    segments = adapter.segments(model)
    set_act_quantizers(model, False)
    try:
        with torch.no_grad():
            quantize_weights(model, segments, cfg, gptq_batches, forward, report, offloader)
    finally:
        set_act_quantizers(model, True)
    if after_weights is not None:
        after_weights()
    with Stage(report, "calibrate"):
        report.static_quantizers = calibrate_static(model, static_batches, forward)
    return report
