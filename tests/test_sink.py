"""The attention-sink scale set (--sink_scale): the first token of each sequence gets its own static
LLM scales, so its massive activations no longer set the scale every other token is rounded with."""
import copy

import torch

from evaluation.builtin import builtin_rows
from fake_quant import pipeline
from fake_quant.config import QuantConfig
from fake_quant.modality import group_index, row_groups
from fake_quant.quant_utils import QuantLinear
from model import registry
from model.base import Loaded, Sample
from tests import DEVICE


def test_group_index_marks_the_first_valid_token_of_each_row():
    visual = torch.tensor([[False, True, True, False], [False, False, True, False]])
    attn = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # the second row is left-padded
    assert group_index(visual).tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]
    assert group_index(visual, sink=True, attention_mask=attn).tolist() == [[2, 1, 1, 0], [0, 2, 1, 0]]
    assert group_index(visual, msq=False, sink=True, attention_mask=attn).tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert [row_groups(m, s) for m in (False, True) for s in (False, True)] == [1, 2, 2, 3]


def _model_with_a_sink(ad, base, batches):
    """The tiny model, with layer 0's MLP made to blow up on token 0 (as trained LLMs do on their
    first token): one gate/up direction fitted to be positive on token 0's input and negative on the
    others', scaled up, so one intermediate channel is orders of magnitude larger there."""
    model = copy.deepcopy(base.model)
    mlp = model.model.language_model.layers[0].mlp
    seen = []
    h = mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    h.remove()
    x = torch.cat(seen)
    target = torch.cat([torch.tensor([1.0] + [-1.0] * (len(s) - 1)) for s in seen])[:, None]
    u = torch.linalg.lstsq(x.double(), target.double()).solution[:, 0].float()
    u = u / (x[0] @ u)  # token 0 projects to 1
    with torch.no_grad():
        mlp.gate_proj.weight[0] += 12.0 * u
        mlp.up_proj.weight[0] += 12.0 * u
    return Loaded(model, base.processor, "tiny")


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b, use_cache=False).logits[0] for b in batches])


def test_sink_scale_rescues_static_activations_from_a_massive_first_token():
    ad = registry.get("qwen2vl")
    base = ad.load("tiny", DEVICE, torch.float32)
    rows = builtin_rows(28, seed=3)
    batches = [ad.build_inputs(base, Sample([r["image"]], r["question"]), DEVICE) for r in rows]
    calib, held_out = batches[:16], batches[16:]
    fp = _model_with_a_sink(ad, base, calib)
    ref = _logits(fp.model, held_out)
    down_in = []
    h = fp.model.model.language_model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: down_in.append(a[0][0].abs().amax(-1)))
    _logits(fp.model, held_out[:1])
    h.remove()
    assert down_in[0][0] > 30 * down_in[0][1:].max()  # a massive first token, as in real LLMs

    errors, models = {}, {}
    for sink in (False, True):
        loaded = Loaded(copy.deepcopy(fp.model), fp.processor, "tiny")
        cfg = QuantConfig(sink_scale=sink, nsamples=4, calib_num=16)
        cfg.llm.quantize = True
        cfg.llm.weight.bits, cfg.llm.act.bits, cfg.llm.act.static = 16, 8, True
        pipeline.run(cfg, ad, loaded, [], calib)
        out = _logits(loaded.model, held_out)
        errors[sink] = float((out - ref).norm() / ref.norm())
        models[sink] = loaded.model
    assert errors[True] < 0.5 * errors[False]  # measured: 0.009 vs 0.161
    qs = {s: [m for m in models[s].modules() if isinstance(m, QuantLinear) and m.input_quantizer is not None]
          for s in (False, True)}
    assert all(q.input_quantizer.num_row_groups == 3 and q.input_quantizer.is_frozen for q in qs[True])
    down = "model.language_model.layers.0.mlp.down_proj"
    text_with, text_without = (dict(models[s].named_modules())[down].input_quantizer.scale.flatten()[0]
                               for s in (True, False))
    assert text_with < 0.1 * text_without  # the text scale no longer covers the sink's range
