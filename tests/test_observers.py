import numpy as np
import pytest
import torch

from fake_quant.bit_type import get_bit_type
from fake_quant.observer import available_observers, build_observer
from fake_quant.qparams import fake_quantize

BT8 = get_bit_type(8, True)


def test_registry_lists_all_and_rejects_unknown():
    assert {"minmax", "percentile", "mse"} <= set(available_observers())
    with pytest.raises(ValueError, match="unknown observer 'foo'"):
        build_observer("foo", bit_type=BT8, symmetric=True)


def test_minmax_is_running_over_batches():
    obs = build_observer("minmax", bit_type=get_bit_type(8, False), symmetric=False, granularity="tensor")
    obs.update(torch.tensor([[0.5, 2.0]]))
    obs.update(torch.tensor([[-3.0, 1.0]]))
    qp = obs.compute()
    assert torch.isclose(qp.scale[0], torch.tensor(5.0 / 255))


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_numpy(p, symmetric):
    torch.manual_seed(0)
    batches = [torch.randn(37, 64) ** 3 for _ in range(3)]
    bt = get_bit_type(8, symmetric)
    obs = build_observer("percentile", bit_type=bt, symmetric=symmetric, granularity="tensor", percentile=p)
    for b in batches:
        obs.update(b)
    allv = torch.cat(batches).numpy().ravel().astype(np.float64)
    lo, hi = np.percentile(allv, 100 - p), np.percentile(allv, p)
    lo_t, hi_t = obs._range(0)
    assert np.isclose(float(lo_t), lo, rtol=1e-5) and np.isclose(float(hi_t), hi, rtol=1e-5)
    qp = obs.compute()
    if symmetric:
        assert np.isclose(float(qp.scale[0]), max(abs(lo), abs(hi)) / 127, rtol=1e-5)
    else:
        assert np.isclose(float(qp.scale[0]), (max(hi, 0) - min(lo, 0)) / 255, rtol=1e-5)


def test_percentile_per_channel_matches_numpy():
    x = torch.randn(200, 5) * torch.tensor([1.0, 2, 3, 4, 5])
    obs = build_observer("percentile", bit_type=BT8, symmetric=True, granularity="channel", percentile=99.0)
    obs.update(x[:120]); obs.update(x[120:])
    lo, hi = obs._range(0)
    assert np.allclose(hi.numpy(), np.percentile(x.numpy(), 99.0, axis=0), rtol=1e-5)
    assert np.allclose(lo.numpy(), np.percentile(x.numpy(), 1.0, axis=0), rtol=1e-5)


def test_sample_pool_is_a_bounded_uniform_sample():
    obs = build_observer("percentile", bit_type=BT8, symmetric=True, granularity="tensor",
                         percentile=90.0, max_samples=4000)
    # 10 batches from very different ranges: a biased sample (e.g. the last batches only) would show
    for k in range(10):
        obs.update(torch.full((1000,), float(k)).reshape(10, 100))
    pool = obs.samples(0)
    assert pool.numel() == 4000
    counts = torch.bincount(pool.long(), minlength=10).float()
    assert (counts - 400).abs().max() < 80
    _, hi = obs._range(0)
    assert float(hi) == pytest.approx(float(np.percentile(pool.numpy(), 90.0)))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran,gs", [("tensor", None), ("row", None), ("group", 16)])
def test_mse_search_never_worse_than_minmax(symmetric, gran, gs):
    torch.manual_seed(3)
    x = torch.randn(8, 64)
    x[0, 0] = 25.0  # an outlier that makes clipping attractive
    bt = get_bit_type(4, symmetric)
    common = dict(bit_type=bt, symmetric=symmetric, granularity=gran, group_size=gs)
    mm = build_observer("minmax", **common); mm.update(x)
    ms = build_observer("mse", **common); ms.update(x)
    from fake_quant.qparams import Granularity, broadcast_qparams, QParams

    def err(qp):
        qp = QParams(qp.scale[0], qp.zero_point[0])
        v, s, z = broadcast_qparams(x, qp, Granularity.parse(gran), gs)
        d = (fake_quantize(v, s, z, bt) - v).abs().pow(2.4)
        return d.reshape(d.shape[0], -1).sum(-1) if gran != "tensor" else d.sum()

    e_mm, e_ms = err(mm.compute()), err(ms.compute())
    assert torch.all(e_ms <= e_mm + 1e-5)
    assert e_ms.sum() < e_mm.sum()  # and it actually helps on this input


def test_row_groups_keep_separate_statistics():
    obs = build_observer("minmax", bit_type=BT8, symmetric=True, granularity="tensor", num_row_groups=3)
    x = torch.tensor([[1.0, -2.0], [10.0, 3.0], [0.5, 0.25], [-30.0, 1.0]])
    obs.update(x, row_groups=torch.tensor([0, 1, 2, 1]))
    qp = obs.compute()
    assert torch.allclose(qp.scale, torch.tensor([2.0, 30.0, 0.5]) / 127)
    with pytest.raises(ValueError, match="pass row_groups"):
        obs.update(x)
    with pytest.raises(ValueError, match="row groups need TENSOR or COLUMN"):
        build_observer("minmax", bit_type=BT8, symmetric=True, granularity="token", num_row_groups=2)
