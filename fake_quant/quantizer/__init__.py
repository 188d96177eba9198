from .uniform import STATIC_GRANULARITIES, UniformQuantizer

__all__ = ["UniformQuantizer", "STATIC_GRANULARITIES"]
