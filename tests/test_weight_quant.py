import pytest
import torch

from fake_quant.quant_utils import WeightQuantizer


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_mse_clip_never_worse_than_no_clip(symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[::4, 3] *= 12  # outliers in some rows
    plain = WeightQuantizer(bits=4, symmetric=symmetric, group_size=group_size)
    clip = WeightQuantizer(bits=4, symmetric=symmetric, group_size=group_size, mse=True)

    def err(q):  # the search's own criterion: sum |err|^2.4 per scale position
        d = (q.quantize(w) - w).abs().pow(2.4)
        return d.reshape(32, -1, group_size or 64).sum(-1)

    e_plain, e_clip = err(plain), err(clip)
    assert torch.all(e_clip <= e_plain * (1 + 1e-5))
    assert e_clip.sum() < e_plain.sum()  # and it helps on this input


def test_rtn_per_channel_matches_manual():
    w = torch.randn(5, 12)
    for kw, div in (({}, 7.5), ({"full_range": False}, 7)):  # default: all 16 levels; absmax / qmax on request
        q = WeightQuantizer(bits=4, **kw).quantize(w)
        s = w.abs().amax(1, keepdim=True) / div
        assert torch.allclose(q, torch.clamp(torch.round(w / s), -8, 7) * s)


def test_group_params_shape():
    qp = WeightQuantizer(bits=4, group_size=4).find_params(torch.randn(3, 16))
    assert qp.scale.shape == (3, 4)
    assert WeightQuantizer(bits=4).find_params(torch.randn(3, 16)).scale.shape == (3,)
