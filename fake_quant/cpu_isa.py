"""What the CPU can do for int8 and bf16 matrix products, read once from torch and /proc/cpuinfo.

The realized int8 model (:mod:`fake_quant.realize`) picks its kernel from this, and every benchmark
prints it next to its numbers: the same code is fast on one machine and a scalar loop on another.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field

import torch

# the extensions that decide int8 / bf16 matmul speed on x86 (reported when present)
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuIsa:
    model: str
    capability: str                  # torch.backends.cpu.get_cpu_capability(): the ATen kernels in use
    vnni: bool                       # int8 dot products that accumulate in int32 without saturating
    amx: bool                        # AMX tiles: int8 and bf16 matrix units
    avx512_bf16: bool                # bf16 dot products on the vector units
    flags: tuple[str, ...] = field(default=())

    @property
    def int8_class(self) -> str:
        """The short name benchmarks print: AMX, VNNI or AVX2 (the int8 path the CPU allows)."""
        return "AMX" if self.amx else ("VNNI" if self.vnni else "AVX2")

    def describe(self) -> str:
        bf16 = "AMX-bf16" if self.amx else ("avx512_bf16" if self.avx512_bf16 else "no bf16 unit")
        return (f"{self.model}; torch CPU capability {self.capability}; int8 path {self.int8_class}; {bf16}; "
                f"flags: {' '.join(self.flags) or 'none reported'}")


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:  # not Linux: torch's own probes are all there is
        return platform.processor() or platform.machine(), set()
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags


@functools.lru_cache(maxsize=1)
def detect() -> CpuIsa:
    model, flags = _cpuinfo()
    vnni = bool(torch.cpu._is_vnni_supported()) or "avx512_vnni" in flags or "avx_vnni" in flags
    amx = bool(torch.cpu._is_amx_tile_supported()) or {"amx_tile", "amx_int8"} <= flags
    bf16 = bool(torch.cpu._is_avx512_bf16_supported()) or "avx512_bf16" in flags
    return CpuIsa(model=model, capability=torch.backends.cpu.get_cpu_capability(), vnni=vnni, amx=amx,
                  avx512_bf16=bf16, flags=tuple(f for f in REPORTED_FLAGS if f in flags))


def torch_build() -> str:
    """torch version plus the oneDNN and MKL versions its CPU kernels come from."""
    cfg = torch.__config__.show()
    parts = [f"torch {torch.__version__}"]
    for line in cfg.splitlines():
        line = line.strip(" -")
        if line.startswith("Intel(R) MKL-DNN") or line.startswith("Intel(R) oneAPI Math Kernel"):
            parts.append(line.split("(Git")[0].replace("Intel(R) ", "").strip())
    parts.append(f"quantized engines {','.join(torch.backends.quantized.supported_engines)}")
    return "; ".join(parts)
