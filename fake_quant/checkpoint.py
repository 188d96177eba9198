"""Save and restore a quantized model: quantized weights and every scale, with safetensors.

The structure (fused norms, rotations, QuantLinear wrappers) is rebuilt deterministically from the
saved configuration; the tensors then come from the file. So a dump taken right after GPTQ makes a
later crash cost nothing but the rebuild.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .quant_utils import QuantLinear

META = "mquant.json"
WEIGHTS = "model.safetensors"


def save(model: nn.Module, directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, WEIGHTS + ".tmp")
    save_model(model, tmp)
    os.replace(tmp, os.path.join(directory, WEIGHTS))  # never leave a half-written file behind
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f, indent=2, default=str)


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, WEIGHTS)):
        raise FileNotFoundError(
            f"--load_gptq {directory!r} is not a quantized-model folder: it needs {META} and {WEIGHTS}, "
            "as written by --dump_gptq"
        )
    with open(path) as f:
        return json.load(f)


def load_tensors(model: nn.Module, directory: str) -> None:
    """Load saved tensors into a model whose structure was rebuilt; create the quantizer buffers
    that exist in the file but are still empty in the fresh model."""
    file = os.path.join(directory, WEIGHTS)
    with safe_open(file, framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    modules = dict(model.named_modules())
    for key in keys:
        owner, _, name = key.rpartition(".")
        mod = modules.get(owner)
        if mod is not None and name in mod._buffers and mod._buffers[name] is None:
            mod._buffers[name] = torch.empty(shapes[key])
    missing, unexpected = load_model(model, file, strict=False)
    unexpected = [k for k in unexpected]
    if missing or unexpected:
        raise RuntimeError(
            f"{file} does not match the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]}): "
            "load it with the same --model_path it was quantized from"
        )
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.weight_scale is not None:
            mod.weight_quantized = True
