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
    """The adapter for a local checkpoint: the family's own, or a sibling that claims the
    checkpoint's architecture (a Qwen2.5-VL folder given to the Qwen2-VL script, say)."""
    _load_builtin()
    cfg = read_config(model_path)
    own = get(family)
    if own.matches(cfg):
        return own
    for cls in _ADAPTERS.values():
        if cls.matches(cfg):
            return cls()
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    raise ValueError(
        f"unsupported architecture {archs} in {model_path}/config.json; supported: "
        + ", ".join(f"{n} ({', '.join(c.architectures)})" for n, c in sorted(_ADAPTERS.items()))
    )


def _load_builtin() -> None:
    from . import causal_lm, llava, qwen2vl  # noqa: F401  (registering the families)
