"""How a block's linears get their Hessians: shared inputs, where the pass stops, and what each layer sees.

Each quantized result is checked against GPTQ run by hand on a Hessian built here from the block's own
inputs (hooks on a plain copy of the block), not against the pipeline's own bookkeeping.
"""
import copy
from collections import Counter

import pytest
import torch
from torch import nn

from fake_quant import pipeline
from fake_quant.config import QuantConfig
from fake_quant.gptq import GPTQ
from fake_quant.quant_utils import QuantLinear, WeightQuantizer

D, F = 32, 48


class Block(nn.Module):
    """Attention-like then MLP-like, with the usual linear names; counts how often each linear runs."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        for n, (i, o) in dict(q=(D, D), k=(D, D), v=(D, D), o=(D, D), gate=(D, F), up=(D, F), down=(F, D)).items():
            setattr(self, n, nn.Linear(i, o, bias=False))
        self.calls = Counter()

    def lin(self, name, x):
        self.calls[name] += 1
        return getattr(self, name)(x)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        att = torch.softmax(self.lin("q", h) @ self.lin("k", h).transpose(-1, -2) / D**0.5, -1)
        x = x + self.lin("o", att @ self.lin("v", h))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.lin("down", nn.functional.silu(self.lin("gate", h)) * self.lin("up", h))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)


NAMES = ["q", "k", "v", "o", "gate", "up", "down"]


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(1, 40, D, generator=g) * torch.linspace(0.2, 3.0, D),), {}) for _ in range(n)]


def wrapped(model):
    for n in NAMES:
        setattr(model.block, n, QuantLinear(getattr(model.block, n), weight_quantizer=WeightQuantizer(bits=4)))
    return {f"block.{n}": getattr(model.block, n) for n in NAMES}


def cfg(true_sequential):
    c = QuantConfig(nsamples=3, calib_num=3)
    c.llm.quantize = True
    c.llm.weight.bits = 4
    c.gptq.act_order = True
    c.gptq.true_sequential = true_sequential
    return c


def hessians_by_hand(block, batches):
    """H of every linear's input, from hooks on a plain (unwrapped) copy of the block."""
    hs = {n: GPTQ(getattr(block, n).in_features) for n in NAMES}
    hooks = [getattr(block, n).register_forward_hook(hs[n].hook) for n in NAMES]
    with torch.no_grad():
        for a, k in batches:
            block(*a, **k)
    for h in hooks:
        h.remove()
    return hs


def gptq_by_hand(h: GPTQ, weight):
    return h.quantize(weight, WeightQuantizer(bits=4), act_order=True,
                      refit_rounds=QuantConfig().gptq.refit_rounds).weight


def test_shared_input_layers_share_one_hessian_and_the_pass_stops_after_the_last_reader():
    model = Model()
    qls = wrapped(model)
    batches = inputs()
    groups = pipeline.execution_groups(model.block, qls, *batches[0])
    assert groups == [["block.q", "block.k", "block.v"], ["block.o"], ["block.gate", "block.up"], ["block.down"]]
    c = cfg(True)
    model.block.calls.clear()
    stopped = pipeline._collect_hessians(groups[:1], qls, model.block, batches, c, called_once=set(qls))
    # q, k and v read one tensor: one Hessian, fed by q; the pass stops inside q, before its matmul
    assert stopped["block.q"] is stopped["block.k"] is stopped["block.v"]
    assert model.block.calls["q"] == 3
    assert model.block.calls["k"] == model.block.calls["v"] == model.block.calls["down"] == 0
    full = pipeline._collect_hessians(groups[:1], qls, model.block, batches, c, called_once=set())
    assert model.block.calls["down"] == 3  # without the call-once guarantee the whole block runs
    assert torch.equal(stopped["block.q"].H, full["block.q"].H)
    assert torch.equal(stopped["block.q"].H, hessians_by_hand(copy.deepcopy(Model().block), batches)["q"].H)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_each_layer_is_gptq_on_the_inputs_its_mode_promises(true_sequential):
    """Layer-wise: every Hessian from the block with its float weights. True-sequential: a layer's Hessian
    from the block whose earlier groups are already quantized."""
    ref = Model().block  # the same seed: the same float weights
    batches = inputs()
    model = Model()
    qls = wrapped(model)
    pipeline._quantize_block(model, "block", batches, cfg(true_sequential), pipeline.PipelineReport())
    expect = {}
    if not true_sequential:
        hs = hessians_by_hand(ref, batches)
        expect = {n: gptq_by_hand(hs[n], getattr(ref, n).weight) for n in NAMES}
    else:
        work = copy.deepcopy(ref)
        for group in (["q", "k", "v"], ["o"], ["gate", "up"], ["down"]):
            hs = hessians_by_hand(work, batches)
            for n in group:
                expect[n] = gptq_by_hand(hs[n], getattr(ref, n).weight)
            with torch.no_grad():
                for n in group:
                    getattr(work, n).weight.copy_(expect[n])
    for n in NAMES:
        assert torch.allclose(qls[f"block.{n}"].weight, expect[n], atol=1e-6), n
    # the two modes differ where they should: q, k, v see the same inputs either way, o does not
    other = Model()
    other_qls = wrapped(other)
    pipeline._quantize_block(other, "block", batches, cfg(not true_sequential), pipeline.PipelineReport())
    assert torch.equal(other_qls["block.q"].weight, qls["block.q"].weight)
    assert not torch.equal(other_qls["block.o"].weight, qls["block.o"].weight)
