"""Helpers the model families' tests share: their inputs, logits and comparisons, a tiny checkpoint's tensors."""
import copy
import json
import os

import torch

from evaluation.builtin import builtin_rows
from fake_quant import pipeline
from fake_quant.config import QuantConfig
from model.base import Loaded, Sample
from tests import DEVICE


def batches(ad, ld, n=3, seed=11):
    return [ad.build_inputs(ld, Sample([r["image"]], r["question"]), DEVICE) for r in builtin_rows(n, seed=seed)]


def logits(model, bs):
    with torch.no_grad():
        return torch.cat([model(**b, use_cache=False).logits[0] for b in bs])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def stored_tensors(path):
    from safetensors import safe_open

    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for fname in sorted(set(index.values())):
        with safe_open(os.path.join(path, fname), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def rotated(ad, base):
    """A copy of ``base`` with both stacks, the connector's cross-attention and the online Hadamards rotated, and
    the pipeline's report."""
    rot = Loaded(copy.deepcopy(base.model), base.processor, base.path)
    cfg = QuantConfig()
    r = cfg.rotation
    r.rotate = r.visual = r.visual_cross_attn = r.llm = r.online_visual_hadamard = r.online_llm_hadamard = True
    return rot, pipeline.run(cfg, ad, rot, [], [])


def count_aifs_attention(monkeypatch):
    """Record the sequence length of every attention call that AIFS computes in the original order."""
    from fake_quant import aifs

    calls = []
    fn = aifs._original_order
    monkeypatch.setattr(aifs, "_original_order", lambda *a, **kw: calls.append(a[0].shape[2]) or fn(*a, **kw))
    return calls
