import copy

import pytest
import torch
from torch import nn

from fake_quant import hadamard_utils as hu
from fake_quant import rotation_utils as ru
from fake_quant.quant_utils import QuantLinear
from fake_quant.spec import Reader, StackSpec, get
from model import qwen2vl, tiny


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def qwen():
    model = tiny.qwen2vl_model(seed=0)
    inputs = tiny.qwen2vl_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    return model, inputs, ref


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


ALL = {
    "visual": ru.RotationOptions(seed=1, online_hadamard=True),
    "llm": ru.RotationOptions(seed=2, online_hadamard=True),
}


@pytest.mark.parametrize("mode", ["hadamard", "random"])
def test_qwen2vl_fully_rotated_gives_the_same_logits(qwen, mode):
    model, inputs, ref = qwen
    rot = copy.deepcopy(model)
    opts = {k: ru.RotationOptions(mode=mode, seed=v.seed, online_hadamard=True) for k, v in ALL.items()}
    report = ru.rotate(rot, qwen2vl.stacks(rot), opts)
    assert rel_diff(logits(rot, inputs), ref) <= 1e-4
    # it really was rotated: every vision and LLM MLP output layer applies H online ...
    assert len(report["visual"]["online_hadamard"]) == 2 and len(report["llm"]["online_hadamard"]) == 2
    down = get(rot, "model.language_model.layers.0.mlp.down_proj")
    assert isinstance(down, QuantLinear) and down.use_online_rotation
    # ... and the weights moved: q_proj is no longer the original one times the norm scale
    g = get(model, "model.language_model.layers.0.input_layernorm").weight
    fused = get(model, "model.language_model.layers.0.self_attn.q_proj").weight * g
    assert (get(rot, "model.language_model.layers.0.self_attn.q_proj").weight - fused).abs().max() > 1e-2


def test_rotation_ready_alone_preserves_logits_and_replaces_norms(qwen):
    model, inputs, ref = qwen
    m = copy.deepcopy(model)
    for s in qwen2vl.stacks(m):
        ru.make_rotation_ready(m, s)
    assert rel_diff(logits(m, inputs), ref) <= 1e-5
    norms = [n for n, mod in m.named_modules() if isinstance(mod, (nn.LayerNorm,))]
    assert norms == []
    assert isinstance(get(m, "model.visual.merger.ln_q"), ru.RMSNorm)
    assert isinstance(get(m, "model.language_model.norm"), ru.RMSNorm)


def test_without_mean_baking_layernorm_conversion_breaks(qwen):
    """Negative control: the invariance test can fail, e.g. if LayerNorm became RMSNorm without
    first making the residual stream zero-mean."""
    model, inputs, ref = qwen
    m = copy.deepcopy(model)
    visual = qwen2vl.stacks(m)[0]
    ru.fold_layer_scales(m, visual)
    ru.fuse_norms(m, visual)  # bake_mean_out skipped
    assert rel_diff(logits(m, inputs), ref) > 1e-2


def test_online_hadamard_alone_is_invariant_and_folds_h(qwen):
    model, inputs, ref = qwen
    m = copy.deepcopy(model)
    llm = qwen2vl.stacks(m)[1]
    W = get(m, "model.language_model.layers.1.mlp.down_proj").weight.detach().clone()
    ru.add_online_hadamard(m, llm)
    assert rel_diff(logits(m, inputs), ref) <= 1e-5
    folded = get(m, "model.language_model.layers.1.mlp.down_proj").weight
    # the RMS property: column 0 of the folded weight holds sqrt(n) * row mean
    assert torch.allclose(folded[:, 0].double(), W.double().mean(1) * W.shape[1] ** 0.5, atol=1e-5)


@pytest.mark.parametrize("fallback", ["pad", "orthogonal"])
def test_online_hadamard_fallbacks_on_an_unsupported_width(fallback):
    model = tiny.qwen2vl_model(seed=3, text={"intermediate_size": 668})  # 668 = 4 * 167: no Hadamard matrix known
    inputs = tiny.qwen2vl_inputs()
    ref = logits(model, inputs)
    llm = qwen2vl.stacks(model)[1]
    with pytest.raises(ValueError, match="no exact Hadamard matrix of order 668"):
        ru.add_online_hadamard(copy.deepcopy(model), llm)
    hu.get_plan.cache_clear()
    with pytest.warns(UserWarning, match="Hadamard fallback"):
        wrapped = ru.add_online_hadamard(model, llm, fallback=fallback)
    down = get(model, wrapped[0])
    if fallback == "pad":
        assert down.in_features == hu.pad_target(668) > 668 and down.bias is None
    else:
        assert down.in_features == 668
    assert rel_diff(logits(model, inputs), ref) <= 1e-5


def test_tied_embeddings_are_untied_then_rotated():
    model = tiny.qwen2vl_model(seed=4, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    inputs = tiny.qwen2vl_inputs()
    ref = logits(model, inputs)
    ru.rotate(model, qwen2vl.stacks(model), {"llm": ru.RotationOptions(seed=5)})
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    assert rel_diff(logits(model, inputs), ref) <= 1e-4


def test_rotation_matrix_is_orthogonal():
    for mode in ("hadamard", "random"):
        q = ru.rotation_matrix(80, mode, seed=1)
        assert torch.allclose(q @ q.t(), torch.eye(80, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="padding cannot change the width of a residual stream"):
        ru.rotation_matrix(668, "hadamard", fallback="pad")


# ---- a pre-LN ViT with LayerScale (DINOv2) -------------------------------------------------
class ViTWithHead(nn.Module):
    """DINOv2 encoder followed by a linear reader of its final norm (as a connector would be)."""

    def __init__(self):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, intermediate_size=384,
                           image_size=56, patch_size=14, layerscale_value=0.5)
        self.vit = Dinov2Model(cfg)
        self.head = nn.Linear(96, 40)

    def forward(self, pixel_values):
        return self.head(self.vit(pixel_values=pixel_values).last_hidden_state)


def dinov2_stack(m: ViTWithHead) -> StackSpec:
    from model.llava import dinov2_stack as build

    return build(m, "vit", (Reader("head"),), final_norm="vit.layernorm", keep_mean=False)


def test_dinov2_with_layerscale_rotated_gives_the_same_output():
    torch.manual_seed(0)
    m = ViTWithHead().eval()
    tiny.randomize_norms_and_biases(m, seed=7)
    with torch.no_grad():
        m.vit.embeddings.cls_token.normal_()
        m.vit.embeddings.position_embeddings.normal_()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = m(x)
    ru.rotate(m, [dinov2_stack(m)], {"visual": ru.RotationOptions(seed=3, online_hadamard=True)})
    assert all(float(l.lambda1.detach().min()) == float(l.lambda1.detach().max()) == 1.0
               for l in (m.vit.encoder.layer[0].layer_scale1, m.vit.encoder.layer[1].layer_scale2))
    with torch.no_grad():
        out = m(x)
    assert rel_diff(out, ref) <= 1e-4


def test_layernorm_bias_is_fused_into_a_reader_without_bias():
    torch.manual_seed(0)
    m = nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 5, bias=False))
    with torch.no_grad():
        m[0].weight.normal_()
        m[0].bias.normal_()
    x = torch.randn(3, 12)
    ref = m(x)
    ru.fuse_norm_into(m, "0", [Reader("1")])
    assert m[1].bias is not None and isinstance(m[1].bias, nn.Parameter)
    assert isinstance(m[0], ru.RMSNorm)
    # a LayerNorm is an RMSNorm of the centred input: centre, then compare
    xc = x - x.mean(-1, keepdim=True)
    assert torch.allclose(m(xc), ref, atol=1e-5)


class ViTWithRawReader(ViTWithHead):
    """LLaVA-style: the reader takes the last hidden state itself, not the final norm's output."""

    def forward(self, pixel_values):
        return self.head(self.vit(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1])


@pytest.mark.parametrize("keep_mean", [True, False])
def test_raw_stream_reader_needs_the_mean_kept(keep_mean):
    import dataclasses

    torch.manual_seed(0)
    m = ViTWithRawReader().eval()
    tiny.randomize_norms_and_biases(m, seed=8)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = m(x)
    spec = dataclasses.replace(dinov2_stack(m), final_norm=None, keep_mean=keep_mean)
    ru.rotate(m, [spec], {"visual": ru.RotationOptions(seed=4, online_hadamard=True)})
    with torch.no_grad():
        out = m(x)
    if keep_mean:  # the norms remove the (rotated) mean direction themselves: exact
        assert rel_diff(out, ref) <= 1e-4
        assert get(m, "vit.encoder.layer.0.norm1").center is not None
    else:  # baking the mean out changes the stream the reader sees
        assert rel_diff(out, ref) > 1e-2
