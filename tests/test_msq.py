"""Modality-specific static quantization: one scale set per modality, chosen per row."""
import torch
from torch import nn

from fake_quant.quant_utils import ActQuantizer, QuantLinear, RowGroupContext
from fake_quant.modality import TEXT, VISUAL


def _layer_and_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 32)
    text = torch.randn(2, 24, 64, generator=g)
    visual = 40.0 * torch.randn(2, 40, 64, generator=g)
    x = torch.cat([visual[:, :20], text[:, :12], visual[:, 20:], text[:, 12:]], dim=1)  # interleaved
    groups = torch.cat([torch.full((2, 20), VISUAL), torch.full((2, 12), TEXT),
                        torch.full((2, 20), VISUAL), torch.full((2, 12), TEXT)], dim=1)
    return lin, x, groups


def _static_layer(lin, ctx, row_groups):
    q = ActQuantizer(8, True, "tensor", static=True, num_row_groups=row_groups, default_row_group=TEXT, context=ctx)
    return QuantLinear(lin, input_quantizer=q)


def test_msq_text_rows_keep_their_resolution():
    lin, x, groups = _layer_and_batch()
    ctx = RowGroupContext()
    msq, single = _static_layer(lin, ctx, 2), _static_layer(lin, ctx, 1)
    for layer in (msq, single):
        layer.input_quantizer.start_calibration()
    ctx.set(groups)
    with torch.no_grad():
        msq(x), single(x)
    msq.input_quantizer.freeze(), single.input_quantizer.freeze()
    # calibrate on one batch, score on another with the same structure
    _, x2, g2 = _layer_and_batch(seed=1)
    ctx.set(g2)
    with torch.no_grad():
        ref = lin(x2)
        e_msq = (msq(x2) - ref)[g2 == TEXT].pow(2).mean()
        e_single = (single(x2) - ref)[g2 == TEXT].pow(2).mean()
        v_msq = (msq(x2) - ref)[g2 == VISUAL].pow(2).mean()
        v_single = (single(x2) - ref)[g2 == VISUAL].pow(2).mean()
    # measured: text-row error ~1/1000 of the shared scale's (a 40x range ratio squared, in MSE)
    assert e_msq < e_single / 300
    assert torch.isclose(v_msq, v_single, rtol=0.25)  # visual rows: both scales come from visual rows
    assert msq.input_quantizer.scale.shape == (2,)
    assert msq.input_quantizer.scale[VISUAL] > 20 * msq.input_quantizer.scale[TEXT]


def test_decode_rows_without_an_index_use_text_scales():
    lin, x, groups = _layer_and_batch()
    ctx = RowGroupContext()
    layer = _static_layer(lin, ctx, 2)
    layer.input_quantizer.start_calibration()
    ctx.set(groups)
    layer(x)
    layer.input_quantizer.freeze()
    step = torch.randn(2, 1, 64)
    ctx.clear()  # a decode step: no visual rows
    as_text = layer(step)
    ctx.set(torch.full((2, 1), TEXT))
    assert torch.equal(as_text, layer(step))
