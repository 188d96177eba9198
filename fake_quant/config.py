"""Typed configuration of a quantization run, validated before any work starts.

The command-line flags (shared by every ``exam/quant_*.py`` script) map one to one onto these
fields; :meth:`QuantConfig.validate` names the *flags* in its messages so a user knows what to change.
A model has two quantized parts: ``visual`` (vision encoder + connector) and ``llm``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .bit_type import FORMATS, MAX_BITS, MIN_BITS
from .observer import available_observers

FP_BITS = 16  # 16 bits means "leave in floating point", as in the paper's scripts


@dataclass
class WeightConfig:
    bits: int = FP_BITS
    symmetric: bool = True      # --w_asym clears it
    group_size: int = -1        # --w_groupsize; -1 = per output channel
    clip: bool = False          # --{part}_w_clip: MSE clip search
    rtn: bool = False           # --{part}_w_rtn: round-to-nearest instead of GPTQ
    full_range: bool = True     # symmetric scale absmax / (qmax + 1/2); --w_qmax_scale: absmax / qmax

    @property
    def enabled(self) -> bool:
        return self.bits < FP_BITS


@dataclass
class ActConfig:
    bits: int = FP_BITS
    symmetric: bool = True      # --a_asym clears it
    static: bool = False        # --{part}_static
    per_tensor: bool = False    # --act_per_tensor (dynamic per-tensor instead of per-token)
    group_size: int = -1        # --a_groupsize (dynamic only)
    clip_ratio: float = 1.0     # --a_clip_ratio
    observer: str = "minmax"    # observer for static calibration
    format: str = "int"         # --a_format: "int" grid, or "e4m3" (FP8, for the FP8 tensor-core kernels)

    @property
    def enabled(self) -> bool:
        return self.bits < FP_BITS


@dataclass
class PartConfig:
    name: str                   # "visual" or "llm": the prefix of its flags
    quantize: bool = False      # --quant_visual_clip / --quant_llm
    weight: WeightConfig = field(default_factory=WeightConfig)
    act: ActConfig = field(default_factory=ActConfig)

    def flag(self, what: str) -> str:
        """Command-line spelling of one of this part's settings."""
        own = {
            "w_bits": f"--{self.name}_w_bits", "a_bits": f"--{self.name}_a_bits",
            "static": f"--{self.name}_static", "w_rtn": f"--{self.name}_w_rtn",
            "w_clip": f"--{self.name}_w_clip",
        }
        shared = {
            "w_groupsize": "--w_groupsize", "a_groupsize": "--a_groupsize", "w_asym": "--w_asym",
            "a_asym": "--a_asym", "a_clip_ratio": "--a_clip_ratio", "act_per_tensor": "--act_per_tensor",
            "a_format": "--a_format",
        }
        return own.get(what) or shared[what]


@dataclass
class GPTQConfig:
    percdamp: float = 0.01      # --percdamp
    act_order: bool = False     # --act_order
    blocksize: int = 128
    static_groups: bool = False
    true_sequential: bool = False  # --gptq_true_sequential: later groups of a block see the earlier ones quantized
    refit_rounds: int = 2          # --gptq_refit: rounds of least-squares scales for GPTQ codes (0: off)


@dataclass
class RotationConfig:
    rotate: bool = False                 # --rotate (master switch)
    visual: bool = False                 # --rotate_visual_clip
    visual_cross_attn: bool = False      # --rotate_visual_cross_attn
    llm: bool = False                    # --rotate_llm
    mode: str = "hadamard"               # --rotate_mode
    online_visual_hadamard: bool = False  # --online_visual_hadamard
    online_llm_hadamard: bool = False     # --online_llm_hadamard
    online_visual_input_hadamard: bool = False  # --online_visual_input_hadamard: before the vision blocks' qkv / fc1
    online_llm_input_hadamard: bool = False     # --online_llm_input_hadamard: before the LLM blocks' qkv / gate, up
    fp32_had: bool = False               # --fp32_had
    hadamard_fallback: str = "error"     # widths with no Hadamard construction: "error", "pad", "orthogonal"


@dataclass
class RMSConfig:
    visual: bool = False        # --visual_split
    llm: bool = False           # --llm_split
    threshold: float = 0.0      # --rms_threshold: split when more than this fraction of rows meets the condition
    keep_fp: bool = False       # --rms_keep_fp: keep the split channel's branch in floating point


@dataclass
class QuantConfig:
    visual: PartConfig = field(default_factory=lambda: PartConfig("visual"))
    llm: PartConfig = field(default_factory=lambda: PartConfig("llm"))
    connector: bool = False      # --quant_cross_attention: the connector, with the visual settings
    msq: bool = True             # --msq / --no_msq: separate static scales for text and visual LLM rows
    aifs: bool = False           # --aifs: visual tokens first at prefill (attention-invariant)
    sink_scale: bool = False     # --sink_scale: one more static LLM scale set, for each sequence's first token
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    rms: RMSConfig = field(default_factory=RMSConfig)
    nsamples: int = 128          # --nsamples: calibration samples for GPTQ
    calib_num: int = 32          # --calib_num: calibration samples for static activation scales
    seed: int = 0                # --seed
    skip_names: tuple[str, ...] = ()  # --skip_names: linear layers left in FP

    def parts(self) -> tuple[PartConfig, PartConfig]:
        return (self.visual, self.llm)

    def part(self, name: str) -> PartConfig | None:
        """Settings of a quantization part ("visual", "connector", "llm"), None if not quantized."""
        if name == "connector":
            return self.visual if self.connector else None
        p = {"visual": self.visual, "llm": self.llm}[name]
        return p if p.quantize else None

    @property
    def any_quantized(self) -> bool:
        return self.visual.quantize or self.llm.quantize or self.connector

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "QuantConfig":
        """Raise ``ValueError`` naming the offending flags; return self when consistent."""
        errors: list[str] = []
        for part in self.parts():
            errors += _part_errors(part, self)
        if not self.gptq.percdamp > 0:
            errors.append(f"--percdamp must be > 0, got {self.gptq.percdamp}")
        if self.gptq.refit_rounds < 0:
            errors.append(f"--gptq_refit must be 0 (off) or a number of rounds, got {self.gptq.refit_rounds}")
        if self.gptq.blocksize < 1:
            errors.append(f"GPTQ block size must be >= 1, got {self.gptq.blocksize}")
        if self.rotation.mode not in ("hadamard", "random"):
            errors.append(f"--rotate_mode must be 'hadamard' or 'random', got {self.rotation.mode!r}")
        if self.rotation.hadamard_fallback not in ("error", "pad", "orthogonal"):
            errors.append("--hadamard_fallback must be 'error', 'pad' or 'orthogonal', "
                          f"got {self.rotation.hadamard_fallback!r}")
        if self.nsamples < 0:
            errors.append(f"--nsamples must be >= 0, got {self.nsamples}")
        if self.calib_num < 0:
            errors.append(f"--calib_num must be >= 0, got {self.calib_num}")
        r = self.rotation
        if (r.visual or r.llm) and not r.rotate:
            errors.append("--rotate_visual_clip / --rotate_llm need --rotate")
        if r.rotate and not (r.visual or r.llm):
            errors.append("--rotate needs --rotate_visual_clip and/or --rotate_llm")
        if r.online_llm_hadamard and not r.llm:
            errors.append("--online_llm_hadamard needs --rotate_llm (the Hadamard folded into down_proj "
                          "is part of the LLM rotation)")
        if r.online_visual_hadamard and not r.visual:
            errors.append("--online_visual_hadamard needs --rotate_visual_clip")
        if r.online_visual_input_hadamard and not r.visual:
            errors.append("--online_visual_input_hadamard needs --rotate_visual_clip")
        if r.online_llm_input_hadamard and not r.llm:
            errors.append("--online_llm_input_hadamard needs --rotate_llm")
        if self.rms.visual and not r.online_visual_hadamard:
            errors.append("--visual_split needs --online_visual_hadamard (it splits the channel the online "
                          "Hadamard concentrates)")
        if not 0.0 <= self.rms.threshold < 1.0:
            errors.append(f"--rms_threshold must be in [0, 1), got {self.rms.threshold}")
        if self.rms.llm and not r.online_llm_hadamard:
            errors.append("--llm_split needs --online_llm_hadamard (it splits the channel the online "
                          "Hadamard concentrates)")
        if errors:
            raise ValueError("invalid quantization settings:\n  - " + "\n  - ".join(errors))
        return self


def _part_errors(p: PartConfig, cfg: QuantConfig) -> list[str]:
    errs: list[str] = []
    w, a = p.weight, p.act
    for what, bits in (("w_bits", w.bits), ("a_bits", a.bits)):
        if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            errs.append(f"{p.flag(what)} must be an integer in {MIN_BITS}..{MAX_BITS} "
                        f"({FP_BITS} keeps floating point), got {bits}")
    if w.group_size == 0 or w.group_size < -1:
        errs.append(f"{p.flag('w_groupsize')} must be -1 (per channel) or positive, got {w.group_size}")
    if a.group_size == 0 or a.group_size < -1:
        errs.append(f"{p.flag('a_groupsize')} must be -1 (none) or positive, got {a.group_size}")
    if not 0.0 < a.clip_ratio <= 1.0:
        errs.append(f"{p.flag('a_clip_ratio')} must be in (0, 1], got {a.clip_ratio}")
    if a.format not in FORMATS:
        errs.append(f"{p.flag('a_format')} must be one of {FORMATS}, got {a.format!r}")
    elif a.format == "e4m3" and a.enabled:
        if a.bits != 8:
            errs.append(f"{p.flag('a_format')} e4m3 is an 8-bit format: set {p.flag('a_bits')} 8 (got {a.bits})")
        if not a.symmetric:
            errs.append(f"{p.flag('a_format')} e4m3 is symmetric: drop {p.flag('a_asym')}")
        if a.group_size > 0:
            errs.append(f"{p.flag('a_format')} e4m3 runs per tensor or per token: drop {p.flag('a_groupsize')}")
    if a.observer not in available_observers():
        errs.append(f"unknown activation observer {a.observer!r} for {p.name}; use one of {available_observers()}")
    if a.static and a.group_size > 0:
        errs.append(f"{p.flag('static')} cannot be combined with {p.flag('a_groupsize')} {a.group_size}: "
                    "static scales are per tensor; drop one of the two")
    if a.static and not a.enabled:
        errs.append(f"{p.flag('static')} needs quantized activations: set {p.flag('a_bits')} below {FP_BITS}")
    if a.per_tensor and a.group_size > 0:
        errs.append(f"{p.flag('act_per_tensor')} cannot be combined with {p.flag('a_groupsize')} {a.group_size}")
    if cfg.gptq.act_order and w.rtn and w.enabled and p.quantize:
        errs.append(f"--act_order only applies to GPTQ; it cannot be combined with {p.flag('w_rtn')}")
    if p.quantize and a.static and cfg.calib_num < 1:
        errs.append(f"{p.flag('static')} needs calibration data: set --calib_num >= 1")
    if p.quantize and w.enabled and not w.rtn and cfg.nsamples < 1:
        errs.append(f"GPTQ on the {p.name} weights needs calibration data: set --nsamples >= 1 "
                    f"or use {p.flag('w_rtn')}")
    return errs
