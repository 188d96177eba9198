"""``--analysis DIR``: the figures and tables a reader of the paper expects, from the rotated FP model.

* ``activation_ranges.csv`` / ``.png``: for every quantized input of every LLM layer, the range
  (min, max, 99.9th percentile of |x|) of visual-token rows and of text-token rows -- the gap MSQ exploits.
* ``rms_weights.csv`` / ``rms/<layer>.png``: for every online-Hadamard layer, each output channel's max
  |weight| with the concentrated mean channel (before RMS) and without it (after RMS).

Statistics are taken after rotation and before any quantization, on the calibration rows.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict

import torch
from torch import nn

from .modality import TEXT, VISUAL, ModalityState, install_tracking
from .quant_utils import QuantLinear, RowGroupContext
from .rms import SplitQuantLinear
from .spec import get

MAX_SAMPLES = 1 << 20  # values per statistic used for the percentile (a strided subsample beyond that)


def _p999(v: torch.Tensor) -> float:
    v = v.reshape(-1).abs().float()
    if v.numel() > MAX_SAMPLES:
        v = v[:: v.numel() // MAX_SAMPLES + 1]
    return float(torch.quantile(v, 0.999)) if v.numel() else float("nan")


def activation_ranges(loaded, adapter, batches: list[dict]) -> list[dict]:
    """Per LLM linear input: min / max / p99.9 of |x| for visual and text rows."""
    model = loaded.model
    state = getattr(loaded, "modality_state", None)
    if state is None or state.context is None:
        state = ModalityState(RowGroupContext())
        install_tracking(loaded, adapter, state)
    llm = next(s for s in adapter.stacks(model) if s.name == "llm")
    targets = {}
    for bp in llm.block_paths(model):
        for name, m in get(model, bp).named_modules():
            if isinstance(m, (nn.Linear, QuantLinear)) and not isinstance(m, SplitQuantLinear):
                targets[f"{bp}.{name}"] = m
    acc: dict = defaultdict(lambda: {"min": float("inf"), "max": float("-inf"), "samples": []})
    hooks = []
    for path, m in targets.items():
        def hook(mod, args, path=path):
            x = args[0].detach()
            idx = state.context.index
            rows = x.reshape(-1, x.shape[-1])
            if idx is None or idx.numel() != rows.shape[0]:
                return
            for label, g in (("visual", VISUAL), ("text", TEXT)):
                sel = rows[idx.to(rows.device) == g]
                if sel.numel() == 0:
                    continue
                a = acc[(path, label)]
                a["min"] = min(a["min"], float(sel.min()))
                a["max"] = max(a["max"], float(sel.max()))
                a["samples"].append(sel.reshape(-1)[:: max(1, sel.numel() // 65536)].float().cpu())
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for (path, label), a in acc.items():
        out.append({"layer": path, "modality": label, "min": a["min"], "max": a["max"],
                    "p99.9_abs": _p999(torch.cat(a["samples"]))})
    return out


def rms_weights(model: nn.Module, paths: list[str]) -> list[dict]:
    """Per output channel of each online-Hadamard layer: max |w| with and without channel 0."""
    rows = []
    for path in paths:
        m = get(model, path)
        if isinstance(m, SplitQuantLinear):
            w = torch.cat([m.branch.weight, m.main.weight], dim=1)
        else:
            w = m.weight
        w = w.detach().float().abs()
        before, after = w.amax(dim=1), w[:, 1:].amax(dim=1)
        rows += [{"layer": path, "channel": i, "max_before": float(b), "max_after": float(a)}
                 for i, (b, a) in enumerate(zip(before.tolist(), after.tolist()))]
    return rows


def write(out_dir: str, act: list[dict], weights: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    files = []
    for name, rows in (("activation_ranges.csv", act), ("rms_weights.csv", weights)):
        if rows:
            path = os.path.join(out_dir, name)
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            files.append(path)
    if act:
        kinds = sorted({_role(r["layer"]) for r in act})
        fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 2.6 * len(kinds)), squeeze=False)
        for ax, kind in zip(axes[:, 0], kinds):
            for label, color in (("visual", "tab:red"), ("text", "tab:blue")):
                sel = [r for r in act if r["modality"] == label and _role(r["layer"]) == kind]
                sel.sort(key=lambda r: _layer_index(r["layer"]))
                xs = [_layer_index(r["layer"]) for r in sel]
                if not xs:
                    continue
                ax.fill_between(xs, [r["min"] for r in sel], [r["max"] for r in sel], color=color, alpha=0.2,
                                label=f"{label} min..max")
                ax.plot(xs, [r["p99.9_abs"] for r in sel], color=color, marker="o", ms=3, label=f"{label} p99.9 |x|")
            ax.set_title(f"input of {kind}")
            ax.set_xlabel("LLM layer")
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, "activation_ranges.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    by_layer = defaultdict(list)
    for r in weights:
        by_layer[r["layer"]].append(r)
    if by_layer:
        os.makedirs(os.path.join(out_dir, "rms"), exist_ok=True)
    for layer, rows in by_layer.items():
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.plot([r["max_before"] for r in rows], lw=0.8, label="max |w| with the mean channel (before RMS)")
        ax.plot([r["max_after"] for r in rows], lw=0.8, label="max |w| without it (after RMS)")
        ax.set_xlabel("output channel")
        ax.set_title(layer, fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "rms", layer.replace(".", "_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def _role(path: str) -> str:
    """The linear's path inside its block: "self_attn.q_proj", "mlp.down_proj.main" ..."""
    parts = path.split(".")
    last_num = max(i for i, p in enumerate(parts) if p.isdigit()) if any(p.isdigit() for p in parts) else -1
    return ".".join(parts[last_num + 1:])


def _layer_index(path: str) -> int:
    nums = [int(p) for p in path.split(".") if p.isdigit()]
    return nums[-1] if nums else 0
