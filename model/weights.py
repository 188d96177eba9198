"""Reading original checkpoint folders: the default dtype while building, the weight shards (safetensors, or
``pytorch_model*.bin`` read with ``weights_only=True``) and copying tensors into a model by name with
errors that name the tensor."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger("mquant")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _indexed(folder: str, index_name: str) -> list[str] | None:
    index = os.path.join(folder, index_name)
    if not os.path.isfile(index):
        return None
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{folder}: {index_name} lists shards that are not there: {', '.join(missing)}; "
                                "download them or remove the index")
    return [os.path.join(folder, f) for f in files]


def shard_files(folder: str, family: str, allow_bin: bool = False) -> list[str]:
    """The weight files of a checkpoint folder: safetensors shards (by their index when there is one), or
    with ``allow_bin`` the ``pytorch_model*.bin`` shards when no safetensors are there."""
    files = _indexed(folder, "model.safetensors.index.json")
    if files is not None:
        return files
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if files:
        return files
    if allow_bin:
        files = _indexed(folder, "pytorch_model.bin.index.json")
        if files is not None:
            return files
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if f.startswith("pytorch_model") and f.endswith(".bin"))
        if files:
            return files
    kinds = "*.safetensors or pytorch_model*.bin" if allow_bin else "*.safetensors"
    raise FileNotFoundError(f"{folder} has no {kinds} weights: give the folder of a {family} checkpoint")


def iter_tensors(path: str) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, loader) pairs of one shard; a tensor is read only when its loader is called."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, (lambda k=key: f.get_tensor(k))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key, t in state.items():
            yield key, (lambda t=t: t)
        del state


def copy_tensor(target: torch.Tensor, t: torch.Tensor, key: str, where: str) -> None:
    if tuple(t.shape) != tuple(target.shape):
        raise ValueError(f"{where}: tensor {key} has shape {tuple(t.shape)}, the config needs "
                         f"{tuple(target.shape)}: config.json and the weights disagree")
    with torch.no_grad():
        target.copy_(t)


def report_missing(folder: str, expected: dict, loaded: set, unexpected: list[str],
                   optional: Callable[[str], bool] = lambda k: False) -> None:
    """Fail on tensors the model needs and the checkpoint lacks; warn about tensors nothing reads."""
    missing = [k for k in expected if k not in loaded and not optional(k)]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model needs: "
                         f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        log.warning("%s: %d tensor(s) in the checkpoint are not used: %s", folder, len(unexpected),
                    ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else ""))


def build_empty(factory: Callable[[], nn.Module], device: str, dtype: torch.dtype) -> nn.Module:
    """``factory()`` built on the meta device and materialized uninitialized on ``device`` (every tensor is
    then filled from the checkpoint)."""
    with torch.device("meta"), default_dtype(dtype):
        model = factory()
    return model.to_empty(device=device)


def load_state(model: nn.Module, folder: str, family: str, allow_bin: bool = False,
               rename: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]] | None = None,
               renamed: tuple[str, ...] = (), skip: Callable[[str], bool] = lambda k: False,
               optional: Callable[[str], bool] = lambda k: False) -> set[str]:
    """Fill ``model``'s state from a checkpoint folder by the original tensor names: ``rename`` maps the original
    keys listed in ``renamed`` to ours (e.g. a packed tensor split in three), ``skip`` names tensors nothing
    needs (buffers some exports carry, layers after the one read), ``optional`` tensors the caller fills itself
    when absent (a tied head). A missing or misshaped tensor fails naming it; other unknown tensors are reported.
    Returns the keys loaded."""
    expected = model.state_dict(keep_vars=True)
    loaded, unexpected = set(), []
    for path in shard_files(folder, family, allow_bin=allow_bin):
        for key, read in iter_tensors(path):
            if skip(key):
                continue
            if key not in expected and key not in renamed:
                unexpected.append(key)
                continue
            for ours, t in (rename(key, read()) if rename is not None and key in renamed else [(key, read())]):
                copy_tensor(expected[ours], t, key, os.path.basename(path))
                loaded.add(ours)
    report_missing(folder, expected, loaded, unexpected, optional)
    return loaded
