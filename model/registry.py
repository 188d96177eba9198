"""Name -> adapter, and checkpoint -> adapter (from config.json's architectures)."""
from __future__ import annotations

from .base import ModelAdapter, read_config

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS[cls.name] = cls
    return cls


def names() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)


def get(name: str) -> ModelAdapter:
    _load_builtin()
    try:
        return _ADAPTERS[name]()
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {names()}") from None


def for_checkpoint(model_path: str, family: str) -> ModelAdapter:
    """The adapter for a local checkpoint: the family's own, or one of its declared siblings that
    claims the checkpoint's architecture (a Qwen2.5-VL folder given to the Qwen2-VL script, say)."""
    _load_builtin()
    cfg = read_config(model_path)
    own = get(family)
    for name in (family, *own.siblings):
        adapter = get(name)
        if adapter.matches(cfg):
            return adapter
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    others = [n for n, cls in sorted(_ADAPTERS.items()) if cls.matches(cfg)]
    hint = f"; it is served by the {others[0]!r} family" if others else ""
    served = [a for name in (family, *own.siblings) for a in _ADAPTERS[name].architectures]
    raise ValueError(f"unsupported architecture {archs} in {model_path}/config.json for the {family} script "
                     f"(it serves {', '.join(served)}){hint}")


def _load_builtin() -> None:
    from . import causal_lm, llava, qwen2vl  # noqa: F401  (registering the families)
    from .internvl2 import adapter  # noqa: F401
    from .qwenvl import adapter as _qwenvl  # noqa: F401
    from .minicpmv import adapter as _minicpmv  # noqa: F401
    from .glm4v import adapter as _glm4v  # noqa: F401
