import pytest
import torch

from fake_quant.bit_type import get_bit_type
from fake_quant.observer import build_observer
from fake_quant.qparams import Granularity, fake_quantize, qparams_from_range
from fake_quant.quant_utils import ActQuantizer, RowGroupContext
from fake_quant.quantizer import UniformQuantizer

GRANS = [("tensor", None), ("row", None), ("column", None), ("group", 8)]


def _outlier_input(rows=12, cols=32):
    x = torch.randn(rows, cols) * torch.linspace(0.1, 3, cols)
    x[3, 5] = 40.0
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran,gs", GRANS)
def test_values_on_grid_and_in_range(bits, symmetric, gran, gs):
    x = _outlier_input()
    bt = get_bit_type(bits, symmetric)
    obs = build_observer("minmax", bit_type=bt, symmetric=symmetric, granularity=gran, group_size=gs)
    obs.update(x)
    qp = obs.compute()
    qp.scale, qp.zero_point = qp.scale[0], qp.zero_point[0]
    quant = UniformQuantizer(bits, symmetric, gran, group_size=gs)
    y = quant.quantize_with(x, qp)
    # recover the integer codes with the same broadcasting the quantizer used
    from fake_quant.qparams import broadcast_qparams
    yv, s, z = broadcast_qparams(y, qp, Granularity.parse(gran), gs)
    codes = yv / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= bt.qmin and codes.round().max() <= bt.qmax
    # every position uses its full range: the extreme code is hit somewhere
    assert codes.round().max() == bt.qmax or codes.round().min() == bt.qmin


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran,gs", GRANS)
def test_quantizing_twice_changes_nothing(symmetric, gran, gs):
    x = _outlier_input()
    q = UniformQuantizer(4, symmetric, gran, group_size=gs)
    y1 = q(x)
    # dynamic: scales recomputed from y1 are those of x, so the second pass is a no-op
    y2 = q(y1)
    assert torch.allclose(y1, y2, atol=1e-6)
    # static frozen scales: exactly idempotent
    if gran in ("tensor", "column"):
        s = UniformQuantizer(4, symmetric, gran, static=True)
        s.start_calibration(); s(x); s.freeze()
        z1 = s(x)
        assert torch.equal(s(z1), z1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_grid_represents_zero_exactly(bits):
    bt = get_bit_type(bits, False)
    for lo, hi in [(-1.3, 7.1), (0.4, 5.0), (-9.0, -0.2), (-1e-3, 123.0)]:
        qp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), bt, symmetric=False)
        assert fake_quantize(torch.zeros(5), qp.scale, qp.zero_point, bt).abs().max() == 0.0
        assert qp.zero_point == qp.zero_point.round()


def test_dynamic_per_token_equals_per_row_quantization():
    x = _outlier_input(7, 16).reshape(7, 16)
    q = UniformQuantizer(8, True, "token")
    y = q(x)
    for r in range(x.shape[0]):
        row = x[r]
        scale = row.abs().max() / 127
        expected = torch.clamp(torch.round(row / scale), -128, 127) * scale
        assert torch.allclose(y[r], expected, atol=0, rtol=0) or torch.allclose(y[r], expected, atol=1e-7)
    # leading dims are flattened into rows: a [2, 3, n] input is 6 tokens
    x3 = torch.randn(2, 3, 16)
    assert torch.equal(q(x3), q(x3.reshape(6, 16)).reshape(2, 3, 16))


def test_asymmetric_dynamic_per_token_matches_manual():
    x = torch.rand(5, 9) + 0.5  # all positive: range widened to include 0
    y = UniformQuantizer(4, False, "token")(x)
    for r in range(5):
        scale = x[r].max() / 15
        zero = torch.round(-0.0 / scale)
        exp = (torch.clamp(torch.round(x[r] / scale) + zero, 0, 15) - zero) * scale
        assert torch.allclose(y[r], exp)


def test_output_keeps_input_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert UniformQuantizer(8, True, "token")(x).dtype == torch.bfloat16


def test_clip_ratio_shrinks_range():
    x = torch.linspace(-1, 1, 101).reshape(1, -1)
    y = UniformQuantizer(8, True, "token", clip_ratio=0.5)(x)
    assert y.abs().max() <= 0.5 * 128 / 127 + 1e-6


def test_static_row_groups_apply_their_own_scale_per_row():
    torch.manual_seed(1)
    small = torch.randn(20, 16) * 0.1      # group 0
    big = torch.randn(20, 16) * 10.0       # group 1
    x = torch.cat([small, big])
    groups = torch.tensor([0] * 20 + [1] * 20)
    q = ActQuantizer(8, True, "tensor", static=True, num_row_groups=2)
    q.start_calibration()
    assert torch.equal(q(x, row_groups=groups), x)  # calibration passes FP through
    q.freeze()
    assert q.scale.shape == (2,)
    assert torch.isclose(q.scale[0], small.abs().max() / 127)
    assert torch.isclose(q.scale[1], big.abs().max() / 127)
    # interleave rows from both groups: each row must be quantized with its group's scale
    perm = torch.randperm(40)
    xp, gp = x[perm], groups[perm]
    y = q(xp, row_groups=gp)
    for r in range(40):
        s = q.scale[gp[r]]
        assert torch.allclose(y[r], torch.clamp(torch.round(xp[r] / s), -128, 127) * s)
    # the small rows keep their resolution: a shared scale would have flattened them
    shared = ActQuantizer(8, True, "tensor", static=True)
    shared.start_calibration(); shared(x); shared.freeze()
    err_sep = (q(xp, row_groups=gp) - xp)[gp == 0].abs().mean()
    err_shared = (shared(xp) - xp)[gp == 0].abs().mean()
    assert err_sep < err_shared / 10


def test_row_groups_from_shared_context_and_default():
    x = torch.cat([torch.randn(4, 8), 50 * torch.randn(4, 8)])
    ctx = RowGroupContext()
    q = ActQuantizer(8, True, "tensor", static=True, num_row_groups=2, default_row_group=1, context=ctx)
    q.start_calibration()
    ctx.set(torch.tensor([0] * 4 + [1] * 4))
    q(x)
    q.freeze()
    y_ctx = q(x)
    assert torch.equal(y_ctx, q(x, row_groups=torch.tensor([0] * 4 + [1] * 4)))
    ctx.clear()  # no index: every row uses the default group (1)
    assert torch.equal(q(x), q(x, row_groups=torch.ones(8, dtype=torch.long)))


def test_static_per_channel_with_row_groups():
    x = torch.randn(10, 6) * torch.arange(1, 7)
    g = torch.tensor([0, 1] * 5)
    q = UniformQuantizer(8, True, "channel", static=True, num_row_groups=2)
    q.start_calibration(); q(x, row_groups=g); q.freeze()
    assert q.scale.shape == (2, 6)
    assert torch.allclose(q.scale[1], x[g == 1].abs().amax(0) / 127)


def test_static_errors_are_clear():
    q = UniformQuantizer(8, True, "tensor", static=True)
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.randn(2, 4))
    with pytest.raises(ValueError, match="static scales must be per tensor or per channel"):
        UniformQuantizer(8, True, "token", static=True)
    two = UniformQuantizer(8, True, "tensor", static=True, num_row_groups=2)
    two.start_calibration()
    two(torch.randn(3, 4), row_groups=torch.tensor([0, 0, 0]))
    with pytest.raises(RuntimeError, match=r"row group\(s\) \[1\] received no data"):
        two.freeze()
    with pytest.raises(ValueError, match="row_groups values must lie in"):
        two.start_calibration(); two(torch.randn(3, 4), row_groups=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="3 entries but the input has 2 rows"):
        two(torch.randn(2, 4), row_groups=torch.tensor([0, 1, 1]))


def test_disabled_quantizer_is_identity():
    q = UniformQuantizer(2, True, "tensor")
    q.enabled = False
    x = torch.randn(3, 5)
    assert q(x) is x
