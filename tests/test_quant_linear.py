import torch
from torch import nn

import pytest

from fake_quant.quant_utils import ActQuantizer, PatchConvLinear, QuantLinear, WeightQuantizer, find_linears


def test_everything_off_equals_linear_exactly():
    lin = nn.Linear(24, 10)
    x = torch.randn(3, 7, 24)
    ql = QuantLinear(lin)
    assert torch.equal(ql(x), lin(x))
    ql = QuantLinear(lin, online_rotation=nn.Identity(), input_quantizer=ActQuantizer(4),
                     weight_quantizer=WeightQuantizer(4), output_quantizer=ActQuantizer(4))
    ql.use_online_rotation = False
    ql.input_quantizer.enabled = ql.output_quantizer.enabled = ql.weight_quantizer.enabled = False
    assert torch.equal(ql(x), lin(x))
    assert ql.weight is lin.weight  # shared, not copied


def test_each_part_is_applied_in_order():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    rot = torch.linalg.qr(torch.randn(16, 16))[0]

    class Rotate(nn.Module):
        def forward(self, x):
            return x @ rot

    aq, wq, oq = ActQuantizer(8, True, "token"), WeightQuantizer(4), ActQuantizer(8, True, "token")
    ql = QuantLinear(lin, online_rotation=Rotate(), input_quantizer=aq, weight_quantizer=wq, output_quantizer=oq)
    x = torch.randn(5, 16)
    expected = oq(nn.functional.linear(aq(x @ rot), wq.quantize(lin.weight), lin.bias))
    assert torch.allclose(ql(x), expected)


def test_weight_quantized_in_place_once():
    lin = nn.Linear(16, 8)
    w0 = lin.weight.detach().clone()
    ql = QuantLinear(lin, weight_quantizer=WeightQuantizer(3))
    x = torch.randn(4, 16)
    on_the_fly = ql(x)
    qp = ql.quantize_weight_()
    assert ql.weight_quantized and not torch.equal(lin.weight, w0)
    assert torch.allclose(ql(x), on_the_fly)
    assert torch.allclose(ql.weight_scale, qp.scale)
    assert torch.equal(WeightQuantizer(3).quantize(ql.weight, qp), ql.weight.data)  # already on its grid


def test_find_linears_skips_names():
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2)))
    assert set(find_linears(m)) == {"0", "2.0"}
    assert set(find_linears(m, skip=("2.",))) == {"0"}


@pytest.mark.parametrize("conv,shape", [
    (nn.Conv3d(3, 8, (2, 14, 14), (2, 14, 14), bias=False), (5, 3, 2, 14, 14)),  # Qwen2-VL: one patch per row
    (nn.Conv2d(3, 8, 14, 14), (2, 3, 56, 42)),                                  # a ViT over a whole image
])
def test_patch_conv_runs_as_a_linear_over_patches(conv, shape):
    x = torch.randn(*shape)
    p = PatchConvLinear(conv)
    assert torch.allclose(p(x), conv(x), atol=1e-5)
    assert p.weight.dtype == conv.weight.dtype
    with pytest.raises(ValueError, match="sizes divisible by"):
        p(torch.randn(2, 3, *[s + 1 for s in shape[2:]]))
    assert not PatchConvLinear.convertible(nn.Conv2d(3, 8, 3, 1, padding=1))
