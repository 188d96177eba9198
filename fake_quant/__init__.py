"""MQuant's shared quantization core: grids, observers, quantizers, GPTQ and configuration.

Nothing in this package knows a model family by name; model knowledge lives in ``model/``.
"""
from .bit_type import BitType, get_bit_type
from .config import ActConfig, GPTQConfig, PartConfig, QuantConfig, RotationConfig, WeightConfig
from .gptq import GPTQ, WeightQuantResult, rtn_quantize
from .observer import build_observer
from .qparams import Granularity, QParams, fake_quantize
from .quant_utils import ActQuantizer, QuantLinear, RowGroupContext, WeightQuantizer
from .quantizer import UniformQuantizer

__all__ = [
    "BitType", "get_bit_type", "Granularity", "QParams", "fake_quantize", "build_observer",
    "UniformQuantizer", "ActQuantizer", "WeightQuantizer", "QuantLinear", "RowGroupContext",
    "GPTQ", "WeightQuantResult", "rtn_quantize",
    "QuantConfig", "PartConfig", "WeightConfig", "ActConfig", "GPTQConfig", "RotationConfig",
]
