"""Keep a model's blocks on the CPU and bring each to the compute device only while it runs.

Everything outside the listed blocks (embeddings, patch embedding, connector, final norm, head)
lives on the device; each block moves there for its forward and back afterwards. While the
pipeline works on one block it *pins* it on the device, so the many passes GPTQ makes over that
block do not move it back and forth.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .spec import get


def _move_(module: nn.Module, device: torch.device | str) -> None:
    """Move parameters and buffers in place (Parameter objects, and so tied weights, are kept)."""
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = b.to(device)


class Offloader:
    def __init__(self, model: nn.Module, block_paths: list[str], device: torch.device | str,
                 home: torch.device | str = "cpu") -> None:
        self.model, self.device, self.home = model, torch.device(device), torch.device(home)
        self.blocks = {p: get(model, p) for p in block_paths}
        self.pinned: set[str] = set()
        self.moves = 0
        self._hooks = []
        block_ids = {id(b) for b in self.blocks.values()}
        self._place(model, block_ids)
        for path, block in self.blocks.items():
            block.to(self.home)
            self._hooks.append(block.register_forward_pre_hook(lambda m, a, p=path: self._arrive(p)))
            self._hooks.append(block.register_forward_hook(lambda m, a, o, p=path: self._leave(p)))

    def _place(self, module: nn.Module, block_ids: set[int]) -> None:
        if id(module) in block_ids:
            return
        _move_(module, self.device)
        for child in module.children():
            self._place(child, block_ids)

    def _arrive(self, path: str) -> None:
        if path not in self.pinned:
            self.blocks[path].to(self.device)
            self.moves += 1

    def _leave(self, path: str) -> None:
        if path not in self.pinned:
            self.blocks[path].to(self.home)

    @contextmanager
    def pin(self, path: str):
        """Keep block ``path`` on the device for the duration (no-op for paths that are not blocks)."""
        if path not in self.blocks:
            yield
            return
        self.blocks[path].to(self.device)
        self.moves += 1
        self.pinned.add(path)
        try:
            yield
        finally:
            self.pinned.discard(path)
            self.blocks[path].to(self.home)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
