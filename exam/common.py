"""The shared command line of every ``exam/quant_*.py`` script: one parser, one main.

Flags follow the MQuant paper's scripts, so their commands run unchanged; a few of ours are added
(``--model_path``, ``--data_root``, ``--output_dir``, ``--device``, ``--dtype``, ``--hadamard_fallback``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time

import torch

from fake_quant import checkpoint, pipeline, prefill_attention
from fake_quant.config import ActConfig, GPTQConfig, PartConfig, QuantConfig, RMSConfig, RotationConfig, WeightConfig

log = logging.getLogger("mquant")

BUILTIN_ROWS = 256  # size of the built-in calibration set (evaluation.builtin)


def build_parser(family: str, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or f"quant_{family}.py",
        description="Rotate and quantize a multimodal LLM (MQuant: static W4A8), then evaluate it.",
    )
    g = p.add_argument_group("model and run")
    from model import registry

    builtin = ", ".join(repr(n) for n in registry.get(family).builtin_models)
    default = registry.get(family).default_checkpoint
    g.add_argument("--model_path", required=default is None, default=None,
                   help=f"local checkpoint folder (config.json + weights), or a built-in model: {builtin} "
                        "('tiny*': tiny random models; 'minivlm': the real-weights MiniVLM)"
                        + (f"; default: {default_model_path(default)} under the working directory, the reference "
                           "repo's layout" if default else ""))
    g.add_argument("--data_root", default=os.environ.get("LMUData", os.path.expanduser("~/LMUData")),
                   help="folder with the VLMEvalKit-format dataset TSVs (default: $LMUData or ~/LMUData)")
    g.add_argument("--output_dir", default="outputs", help="where results.json is written")
    g.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--prefill_attention", default="sdpa", choices=list(prefill_attention.MODES),
                   help="causal prefill attention of the language model: torch's SDPA kernel, or 'blocked' bf16 GEMMs "
                        "over blocks of queries (on a CPU with --dtype bfloat16: 2-3x torch's kernel at thousands of "
                        "tokens; fake_quant/prefill_attention.py)")
    g.add_argument("--offload", action="store_true",
                   help="keep the transformer blocks on the CPU and move one at a time to --device (less GPU memory)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--dataset_name", default=None,
                   help="benchmark to calibrate on and evaluate (default: the built-in generated set, no evaluation)")
    g.add_argument("--calib_source", default="heldout",
                   help="'heldout' (default): calibrate on a seeded held-out part of the dataset, never scored; or the "
                        "name / path of another TSV in --data_root (e.g. a training split) to calibrate on")
    g.add_argument("--eval_num", type=int, default=None, help="score at most this many rows (default: all)")
    g.add_argument("--max_new_tokens", type=int, default=128, help="decoding length for evaluation")
    g.add_argument("--greedy", action="store_true",
                   help="decode greedily where the family's VLMEvalKit setting is beam search (MiniCPM-V: 3 beams, "
                        "repetition penalty 1.2); the other families decode greedily anyway")
    g.add_argument("--eval_backend", default="mquant", choices=["mquant", "vlmeval"],
                   help="score with this project's scorers (default) or with an installed VLMEvalKit (third/README.md)")
    g.add_argument("--nsamples", type=int, default=8, help="calibration samples for GPTQ")
    g.add_argument("--calib_num", type=int, default=32, help="calibration samples for static activation scales")
    g.add_argument("--holdout_num", type=int, default=None,
                   help="with --dataset_name: how many rows to hold out for calibration (default: --nsamples, or "
                        "--calib_num when larger and scales are static); runs compared in one table pass the same "
                        "value, so that they all score the same rows")
    g.add_argument("--dump_gptq", default=None, help="folder to save the quantized model to (safetensors)")
    g.add_argument("--analysis", default=None, metavar="DIR",
                   help="write activation-range and RMS weight plots (PNG) and tables (CSV) of the rotated FP model to DIR")
    g.add_argument("--load_gptq", default=None, help="folder of a saved quantized model: skips rotation-time GPTQ and calibration")

    g = p.add_argument_group("rotation")
    g.add_argument("--rotate", action="store_true", help="enable rotation (then pick the parts below)")
    g.add_argument("--rotate_visual_clip", action="store_true", help="rotate the vision encoder's residual stream")
    g.add_argument("--rotate_visual_cross_attn", action="store_true",
                   help="rotate the connector: a per-head V/O Hadamard in a cross-attention connector (Qwen-VL's "
                        "resampler); a connector without attention (Qwen2-VL's merger) is rotated with the streams "
                        "it bridges, so this adds nothing there")
    g.add_argument("--rotate_llm", action="store_true", help="rotate the LLM's residual stream")
    g.add_argument("--rotate_mode", default="hadamard", choices=["hadamard", "random"])
    g.add_argument("--online_visual_hadamard", action="store_true", help="online Hadamard before the vision MLP output layer")
    g.add_argument("--online_llm_hadamard", action="store_true", help="online Hadamard before the LLM down_proj")
    g.add_argument("--online_visual_input_hadamard", action="store_true",
                   help="(ours) online Hadamard also before each vision block's attention and MLP input layers (qkv, "
                        "fc1): rotates what they quantize at run time, where the stream cannot be rotated offline "
                        "(GLM-4V's post-norm EVA2-CLIP); costs one transform per layer and token")
    g.add_argument("--online_llm_input_hadamard", action="store_true",
                   help="(ours) online Hadamard also before each LLM block's attention and MLP input layers")
    g.add_argument("--fp32_had", action="store_true", help="compute online Hadamard transforms in float32")
    g.add_argument("--hadamard_fallback", default="error", choices=["error", "pad", "orthogonal"],
                   help="for widths with no Hadamard construction: fail, zero-pad, or a random orthogonal block")
    g.add_argument("--visual_split", action="store_true", help="rotation magnitude suppression in the vision MLP")
    g.add_argument("--llm_split", action="store_true", help="rotation magnitude suppression in the LLM MLP")
    g.add_argument("--rms_keep_fp", action="store_true", help="keep the split channel's branch in floating point")
    g.add_argument("--rms_threshold", type=float, default=0.0,
                   help="split a layer when more than this fraction of its rows meets the RMS condition (default 0: any row)")

    g = p.add_argument_group("quantization")
    g.add_argument("--quant", action="store_true", help="enable quantization (then pick the parts below)")
    g.add_argument("--quant_visual_clip", action="store_true", help="quantize the vision encoder")
    g.add_argument("--quant_cross_attention", action="store_true", help="quantize the connector (visual settings)")
    g.add_argument("--quant_llm", action="store_true", help="quantize the LLM")
    g.add_argument("--visual_w_bits", type=int, default=4)
    g.add_argument("--visual_a_bits", type=int, default=8)
    g.add_argument("--llm_w_bits", type=int, default=4)
    g.add_argument("--llm_a_bits", type=int, default=8)
    g.add_argument("--w_groupsize", type=int, default=-1)
    g.add_argument("--a_groupsize", type=int, default=-1)
    g.add_argument("--w_asym", action="store_true")
    g.add_argument("--w_qmax_scale", action="store_true",
                   help="symmetric weight scale absmax / qmax (absmax / 7 for int4, the QuaRot and MQuant reference "
                        "convention) instead of the default absmax / (qmax + 1/2), which also uses the -8 level")
    g.add_argument("--a_asym", action="store_true")
    g.add_argument("--a_clip_ratio", type=float, default=1.0)
    g.add_argument("--a_format", default="int", choices=["int", "e4m3"],
                   help="activation grid: integers (the paper), or FP8 e4m3 (8 bits, symmetric; what Hopper's FP8 "
                        "tensor cores take, see docs/realquant.md)")
    g.add_argument("--act_per_tensor", action="store_true", help="dynamic per-tensor instead of per-token activations")
    g.add_argument("--visual_static", action="store_true", help="static per-tensor activation scales in the vision part")
    g.add_argument("--llm_static", action="store_true", help="static per-tensor activation scales in the LLM")
    g.add_argument("--visual_w_clip", action="store_true", help="MSE clip search for vision weights")
    g.add_argument("--llm_w_clip", action="store_true", help="MSE clip search for LLM weights")
    g.add_argument("--visual_w_rtn", action="store_true", help="round-to-nearest instead of GPTQ for vision weights")
    g.add_argument("--llm_w_rtn", action="store_true", help="round-to-nearest instead of GPTQ for LLM weights")
    g.add_argument("--percdamp", type=float, default=0.01)
    g.add_argument("--act_order", action="store_true")
    g.add_argument("--gptq_true_sequential", action="store_true",
                   help="inside a block, calibrate each group of linears (q/k/v, o, gate/up, down) on the outputs of "
                        "the groups before it once they are quantized (default: every linear's Hessian from one pass "
                        "of the block with its float weights)")
    g.add_argument("--gptq_refit", type=int, default=GPTQConfig.refit_rounds, metavar="ROUNDS",
                   help="after GPTQ, give each weight row the least-squares scale for its integer codes on the "
                        "calibration inputs; each further round reruns GPTQ with those scales and refits "
                        f"(0: off; default {GPTQConfig.refit_rounds})")
    g.add_argument("--msq", dest="msq", action="store_true", default=True,
                   help="modality-specific quantization: with --llm_static, separate static scales for visual and "
                        "text tokens in the LLM (default)")
    g.add_argument("--no_msq", dest="msq", action="store_false", help="one static scale shared by all LLM tokens")
    g.add_argument("--sink_scale", action="store_true",
                   help="with --llm_static: one more static scale set for the first token of every sequence (the "
                        "attention sink, whose activations dwarf all others); not part of the paper's method")
    g.add_argument("--aifs", action="store_true",
                   help="attention-invariant flexible switching: visual tokens first at prefill, same outputs")
    g.add_argument("--skip_names", nargs="+", default=[], help="leave linears whose name contains any of these in FP")

    g = p.add_argument_group("real int8 / FP8 execution")
    g.add_argument("--real_quant", action="store_true",
                   help="after calibration, run the quantized linears on integer or FP8 kernels instead of fake "
                        "quantization: 8-bit activations (static per tensor, MSQ / sink sets, or dynamic per "
                        "token), per-channel weights of at most 8 bits; docs/realquant.md")
    g.add_argument("--real_quant_backend", default="auto", choices=["auto", "onednn", "fbgemm", "int_mm", "fp8"],
                   help="kernels for --real_quant. auto: fp8 (torch._scaled_mm) for --a_format e4m3; otherwise "
                        "int_mm (torch._int_mm) on a GPU, oneDNN on a CPU with VNNI or AMX, fbgemm on other CPUs")
    g.add_argument("--real_quant_layout", default="auto", choices=["auto", "slices", "gather", "rows"],
                   help="how a layer with several static scale sets (MSQ, --sink_scale) runs its rows. auto: one "
                        "call with a scale per row on int_mm / fp8; on oneDNN / fbgemm, per forward, its contiguous "
                        "runs as slices when they are few (always with --aifs) and gathered and scattered otherwise")
    g.add_argument("--real_quant_fuse", action="store_true",
                   help="with --real_quant: compile each activation quantization into one loop (torch.compile; "
                        "needs a C++ compiler, compiles once per run)")
    return p


def default_model_path(checkpoint: str) -> str:
    return os.path.join("weights", checkpoint)


def resolve_model_path(args: argparse.Namespace, family: str) -> str | None:
    """``--model_path``, or the family's default folder ``weights/<checkpoint>``; None with an error message
    when that default is absent."""
    from model import registry

    if args.model_path is not None:
        return args.model_path
    path = default_model_path(registry.get(family).default_checkpoint)
    if not os.path.isdir(path):
        return None
    return path


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    def part(name: str, quantize: bool, w_bits, a_bits, static, w_clip, w_rtn) -> PartConfig:
        return PartConfig(
            name=name, quantize=args.quant and quantize,
            weight=WeightConfig(bits=w_bits, symmetric=not args.w_asym, group_size=args.w_groupsize, clip=w_clip, rtn=w_rtn,
                                full_range=not args.w_qmax_scale),
            act=ActConfig(bits=a_bits, symmetric=not args.a_asym, static=static, per_tensor=args.act_per_tensor,
                          group_size=args.a_groupsize, clip_ratio=args.a_clip_ratio, format=args.a_format),
        )

    return QuantConfig(
        visual=part("visual", args.quant_visual_clip, args.visual_w_bits, args.visual_a_bits, args.visual_static,
                    args.visual_w_clip, args.visual_w_rtn),
        llm=part("llm", args.quant_llm, args.llm_w_bits, args.llm_a_bits, args.llm_static, args.llm_w_clip, args.llm_w_rtn),
        connector=args.quant and args.quant_cross_attention,
        msq=args.msq, aifs=args.aifs, sink_scale=args.sink_scale,
        gptq=GPTQConfig(percdamp=args.percdamp, act_order=args.act_order, true_sequential=args.gptq_true_sequential,
                        refit_rounds=args.gptq_refit),
        rotation=RotationConfig(rotate=args.rotate, visual=args.rotate_visual_clip, visual_cross_attn=args.rotate_visual_cross_attn,
                                llm=args.rotate_llm, mode=args.rotate_mode, online_visual_hadamard=args.online_visual_hadamard,
                                online_llm_hadamard=args.online_llm_hadamard, fp32_had=args.fp32_had,
                                online_visual_input_hadamard=args.online_visual_input_hadamard,
                                online_llm_input_hadamard=args.online_llm_input_hadamard,
                                hadamard_fallback=args.hadamard_fallback),
        rms=RMSConfig(visual=args.visual_split, llm=args.llm_split, threshold=args.rms_threshold, keep_fp=args.rms_keep_fp),
        nsamples=args.nsamples, calib_num=args.calib_num, seed=args.seed, skip_names=tuple(args.skip_names),
    )


def check_args(args: argparse.Namespace, cfg: QuantConfig) -> list[str]:
    """Problems with the command line, beyond what QuantConfig.validate checks."""
    errs = []
    part_flags = {"--quant_visual_clip": args.quant_visual_clip, "--quant_cross_attention": args.quant_cross_attention,
                  "--quant_llm": args.quant_llm}
    if not args.quant and any(part_flags.values()):
        errs.append(f"{', '.join(k for k, v in part_flags.items() if v)} need --quant")
    if args.quant and not any(part_flags.values()):
        errs.append("--quant needs at least one of --quant_visual_clip, --quant_cross_attention, --quant_llm")
    if args.dataset_name is None and args.calib_source != "heldout":
        errs.append("--calib_source needs --dataset_name")
    if args.eval_backend == "vlmeval":
        if args.dataset_name is None:
            errs.append("--eval_backend vlmeval needs --dataset_name")
        else:
            try:
                from evaluation.vlmeval_bridge import require_vlmeval

                require_vlmeval()
            except RuntimeError as e:
                errs.append(str(e))
    needed = max(args.nsamples, args.calib_num if (args.visual_static or args.llm_static) else 0)
    if args.dataset_name is None and needed > BUILTIN_ROWS:
        errs.append(f"--nsamples/--calib_num ask for {needed} calibration rows but the built-in set has {BUILTIN_ROWS}")
    if args.real_quant:
        errs += _real_quant_errors(args, cfg)
    elif args.real_quant_fuse or args.real_quant_backend != "auto" or args.real_quant_layout != "auto":
        errs.append("--real_quant_backend / --real_quant_layout / --real_quant_fuse need --real_quant")
    if args.prefill_attention == "blocked":
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        if not device.startswith("cpu") or dtype != torch.bfloat16:
            errs.append(f"--prefill_attention blocked computes the attention with bf16 GEMMs on a CPU, but this run is "
                        f"{device} / {str(dtype).replace('torch.', '')}: add --device cpu --dtype bfloat16, or drop "
                        "the flag (torch's SDPA kernel is the fast one on a GPU and in float32)")
    if args.holdout_num is not None and args.dataset_name is None:
        errs.append("--holdout_num needs --dataset_name")
    elif args.holdout_num is not None and args.holdout_num < needed:
        errs.append(f"--holdout_num {args.holdout_num} is less than the {needed} calibration rows --nsamples/--calib_num "
                    "ask for: raise it or lower them")
    return errs


def _real_quant_errors(args: argparse.Namespace, cfg: QuantConfig) -> list[str]:
    """--real_quant: settings no kernel serves, a device or torch build without the kernels."""
    from fake_quant import realize

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return [f"--real_quant --device {device}: CUDA is not available on this machine; the CPU kernels run with "
                "--device cpu"]
    backend = None
    try:
        backend = realize.choose_backend(args.real_quant_backend, device, realize.act_format(cfg))
    except (realize.KernelUnavailable, ValueError) as e:
        errs = [f"--real_quant: {e}"]
    else:
        errs = []
    errs = realize.config_errors(cfg, backend) + errs
    if args.offload:
        errs.append("--real_quant cannot be combined with --offload (the kernels hold the weights on one device)")
    if backend is not None and args.real_quant_layout == "rows" and backend not in realize.SCALED_MM_KERNELS:
        errs.append(f"--real_quant_layout rows needs a kernel with a row-scale epilogue (int_mm, fp8), not {backend}")
    if args.real_quant_fuse and not realize.cpp_compiler():
        errs.append("--real_quant_fuse compiles the quantization with torch.compile, which needs a C++ compiler "
                    "(g++ or clang++ on PATH, or $CXX); install one or drop --real_quant_fuse")
    return errs


def _validation_errors(cfg: QuantConfig) -> list[str]:
    try:
        cfg.validate()
    except ValueError as e:
        return [line.strip().removeprefix("- ") for line in str(e).splitlines()[1:]]
    return []


def resolve_device_dtype(device: str | None, dtype: str) -> tuple[str, torch.dtype]:
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {dev}: CUDA is not available on this machine; use --device cpu")
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    return dev, getattr(torch, dtype)


def peak_memory() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
             "asimd", "sve")  # the extensions that decide CPU int8 / bf16 matmul speed


def machine() -> dict:
    """What a run's times and memory were measured on (the report prints it beside them)."""
    info: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:  # not Linux: platform.processor() is all there is
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["cpu"] = value.strip()
        elif key.strip() in ("flags", "Features"):  # the first processor's list stands for all
            have = set(value.split())
            info["isa"] = [f for f in ISA_FLAGS if f in have]
            break
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def main(family: str, argv: list[str] | None = None, prog: str | None = None) -> dict:
    parser = build_parser(family, prog)
    args = parser.parse_args(argv)
    with prefill_attention.use(args.prefill_attention):  # calibration and evaluation alike, restored after
        return _main(family, argv, prog, parser, args)


def _main(family: str, argv: list[str] | None, prog: str | None, parser: argparse.ArgumentParser,
          args: argparse.Namespace) -> dict:
    from evaluation import datasets
    from evaluation.builtin import builtin_rows
    from evaluation.eval import evaluate
    from evaluation.uncertainty import bootstrap
    from model import registry
    from model.base import Sample

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    torch.set_grad_enabled(False)
    cfg = config_from_args(args)
    problems = _validation_errors(cfg) + check_args(args, cfg)
    if problems:
        parser.error("\n  - " + "\n  - ".join(problems))

    t_start = time.perf_counter()
    own = registry.get(family)
    model_path = resolve_model_path(args, family)
    if model_path is None:
        path = default_model_path(own.default_checkpoint)
        parser.error(f"no --model_path given and the default checkpoint folder {path} does not exist under "
                     f"{os.getcwd()}: put the {own.default_checkpoint} checkpoint folder there, or pass "
                     f"--model_path FOLDER (or --model_path tiny for the built-in tiny model)")
    args.model_path = model_path
    n_calib = max(args.nsamples, args.calib_num if (cfg.visual.act.static or cfg.llm.act.static) else 0)
    if args.holdout_num is not None:
        n_calib = args.holdout_num
    data = other = None
    if args.dataset_name is not None:  # a missing benchmark file fails here, before the model is loaded
        try:
            data = datasets.load_rows(args.data_root, args.dataset_name)
            other = None if args.calib_source == "heldout" else datasets.load_rows(args.data_root, args.calib_source)
        except datasets.DatasetError as e:
            parser.error(str(e))
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    try:
        adapter = own if args.model_path in own.builtin_models else registry.for_checkpoint(args.model_path, family)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    torch.manual_seed(args.seed)
    report = pipeline.PipelineReport()
    with pipeline.Stage(report, "load"):
        loaded = adapter.load(args.model_path, "cpu" if args.offload else device, dtype)
    if args.prefill_attention != "sdpa":  # transformers decoders: through the project's attention implementation
        pipeline.use_project_attention(adapter, loaded)
    if args.greedy and adapter.decoding(loaded).get("num_beams", 1) > 1:
        loaded.generation.update(num_beams=1, repetition_penalty=1.0)

    eval_rows: list[dict] = []
    if args.dataset_name is None:
        rows = builtin_rows(BUILTIN_ROWS, seed=args.seed)
        calib_rows, calib_info = rows[:n_calib], {"source": "builtin", "seed": args.seed}
        def image(r):
            return r["image"]
    else:
        try:
            split = datasets.split_rows(data, n_calib, args.seed, other, args.calib_source)
        except datasets.DatasetError as e:
            parser.error(str(e))
        calib_rows, eval_rows = split.calib, split.eval[: args.eval_num]
        calib_info = {"source": split.source, "seed": args.seed, "held_out_rows": split.calib_indices}
        def image(r):
            return datasets.image_of(r, args.data_root)
    gptq_rows = calib_rows[: args.nsamples]
    static_rows = calib_rows[: args.calib_num] if (cfg.visual.act.static or cfg.llm.act.static) else []
    with pipeline.Stage(report, "inputs"):
        def batches(rs):
            # calibration rows are asked like the scored rows: the dataset's prompt and image settings
            def sample(r):
                if args.dataset_name is None:
                    return Sample([image(r)], r["question"], r.get("answer"), r["index"])
                return Sample([image(r)], adapter.prompt(args.dataset_name, r), r.get("answer"), r["index"],
                              meta={"dataset": args.dataset_name})
            return [adapter.build_inputs(loaded, sample(r), device) for r in rs]
        gptq_batches, static_batches = batches(gptq_rows), batches(static_rows)

    meta = {"adapter": adapter.name, "model_path": args.model_path, "config": cfg.to_dict()}
    if args.load_gptq:
        saved = checkpoint.read_meta(args.load_gptq)
        if saved.get("adapter") != adapter.name:
            parser.error(f"--load_gptq {args.load_gptq} holds a {saved.get('adapter')} model, not {adapter.name}")
        if saved["config"] != meta["config"]:
            log.warning("--load_gptq: the saved model was quantized with other flags; its own settings are used")
        cfg = _config_from_dict(saved["config"])
        with pipeline.Stage(report, "restore"):
            pipeline.rebuild(cfg, adapter, loaded, report)
            checkpoint.load_tensors(loaded.model, args.load_gptq)
            if args.offload:
                pipeline.offload(adapter, loaded, device)
            if not saved.get("calibrated", True):
                report.static_quantizers = pipeline.calibrate_static(
                    loaded.model, static_batches, lambda b: loaded.model(**b, use_cache=False))
    else:
        after_weights = None
        if args.dump_gptq:
            def after_weights():
                checkpoint.save(loaded.model, args.dump_gptq, {**meta, "calibrated": False})
                log.info("saved the GPTQ model (before activation calibration) to %s", args.dump_gptq)
        pipeline.run(cfg, adapter, loaded, gptq_batches, static_batches, report, after_weights=after_weights,
                     offload_device=device if args.offload else None, analysis_dir=args.analysis)
        if args.dump_gptq:
            with pipeline.Stage(report, "dump"):
                checkpoint.save(loaded.model, args.dump_gptq, {**meta, "calibrated": True})

    realized = None
    if args.real_quant:  # the dump above keeps the fake-quant tensors; the int8 layers live only in this run
        realized = pipeline.realize(cfg, loaded, args.real_quant_backend, args.real_quant_fuse, report,
                                    layout=args.real_quant_layout).to_dict()

    evaluation = demo = None
    if args.dataset_name is None:
        # a held-out row (never used for calibration) answered by the quantized model
        demo_row = rows[n_calib]
        with pipeline.Stage(report, "generate"):
            inputs = adapter.build_inputs(loaded, Sample([demo_row["image"]], demo_row["question"]), device)
            out = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False, **adapter.decoding(loaded))
            demo = {"row": demo_row["index"], "question": demo_row["question"],
                    "answer": adapter.decode(loaded, out[:, inputs["input_ids"].shape[1]:])}
    else:
        with pipeline.Stage(report, "evaluate"):
            run_meta = {**meta, "load_gptq": args.load_gptq, "max_new_tokens": args.max_new_tokens,
                        "decoding": adapter.decoding(loaded),
                        "calibration": calib_info}
            if args.eval_backend == "vlmeval":
                from evaluation import vlmeval_bridge

                evaluation = vlmeval_bridge.evaluate(adapter, loaded, args.dataset_name, args.output_dir, device,
                                                     args.max_new_tokens, args.data_root, calib_info["held_out_rows"])
            else:
                evaluation = evaluate(adapter, loaded, args.dataset_name, eval_rows, args.output_dir, device,
                                      args.max_new_tokens, run_meta, args.data_root)
                # the score's 95% bootstrap interval (rows resampled, the dataset's scorer on each draw)
                evaluation["interval_95"] = bootstrap(args.dataset_name, eval_rows,
                                                      evaluation.pop("predictions")).as_dict()
        if args.eval_backend == "mquant":
            scored = {str(r["index"]) for r in eval_rows}
            assert not scored & {str(r["index"]) for r in calib_rows}, "a calibration row was scored"

    results = {
        "model": {"adapter": adapter.name, "model_path": args.model_path, "device": device,
                  "dtype": str(dtype).replace("torch.", ""), "prefill_attention": args.prefill_attention},
        "config": cfg.to_dict(),
        "command": " ".join(sys.argv if argv is None else [prog or f"quant_{family}.py", *argv]),
        "calibration": {**calib_info, "gptq_rows": [r["index"] for r in gptq_rows],
                        "static_rows": [r["index"] for r in static_rows]},
        "decoding": adapter.decoding(loaded) or {"num_beams": 1},
        "demo": demo,
        "pipeline": report.to_dict(),
        "real_quant": realized,
        "memory": peak_memory(),
        "total_seconds": time.perf_counter() - t_start,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "machine": machine()},
        "evaluation": evaluation,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(_summary(results, path))
    return {"results": results, "loaded": loaded, "adapter": adapter}


def _config_from_dict(d: dict) -> QuantConfig:
    def part(p):
        # dumps written before full_range existed used absmax / qmax
        weight = WeightConfig(**{"full_range": False, **p["weight"]})
        return PartConfig(name=p["name"], quantize=p["quantize"], weight=weight, act=ActConfig(**p["act"]))

    return QuantConfig(visual=part(d["visual"]), llm=part(d["llm"]), connector=d["connector"], msq=d.get("msq", True),
                       aifs=d.get("aifs", False), sink_scale=d.get("sink_scale", False),
                       gptq=GPTQConfig(**{"true_sequential": True, "refit_rounds": 0, **d["gptq"]}), rotation=RotationConfig(**d["rotation"]),
                       rms=RMSConfig(**d["rms"]), nsamples=d["nsamples"], calib_num=d["calib_num"], seed=d["seed"], skip_names=tuple(d["skip_names"]))


def _summary(r: dict, path: str) -> str:
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in r["pipeline"]["seconds"].items())
    n_gptq = sum(1 for v in r["pipeline"]["layers"].values() if v["method"] == "gptq")
    n_rtn = sum(1 for v in r["pipeline"]["layers"].values() if v["method"] == "rtn")
    cal = r["calibration"]
    lines = [f"model: {r['model']['adapter']} ({r['model']['model_path']}) on {r['model']['device']}/{r['model']['dtype']}",
             f"weights: {n_gptq} layers GPTQ, {n_rtn} RTN; static activation quantizers: {r['pipeline']['static_quantizers']}",
             f"calibration ({cal['source']}): {len(cal['gptq_rows'])} GPTQ rows, {len(cal['static_rows'])} static rows"]
    if r["demo"] is not None:
        lines.append(f"held-out row {r['demo']['row']} answered: {r['demo']['answer']!r}")
    if r["evaluation"] is not None:
        ev = r["evaluation"]
        shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev["scores"].items())
        lines.append(f"{ev['dataset']} on {ev['rows_scored']} rows (none used for calibration): {shown}")
        if ev.get("interval_95"):
            iv = ev["interval_95"]
            lines.append(f"{ev['dataset']} score {iv['score']:.2f}, 95% bootstrap interval {iv['low']:.2f} to "
                         f"{iv['high']:.2f}")
    if r.get("real_quant"):
        rq = r["real_quant"]
        kind = "FP8" if rq["backend"] == "fp8" else "int8"
        lines.append(f"real {kind} execution: {len(rq['layers'])} linears on {rq['backend']} ({rq['isa']})")
    lines.append(f"stages: {secs}; total {r['total_seconds']:.1f}s; peak RSS {r['memory']['peak_rss_mb']:.0f} MB")
    lines.append(f"results: {path}")
    return "\n".join(lines)
