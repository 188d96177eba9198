"""The own decoders' mask: None (SDPA's ``is_causal``) where that is the plain causal rule, else the explicit mask."""
import pytest
import torch
import torch.nn.functional as F

from fake_quant import aifs
from model.layers import attention_mask_4d, attention_mask_or_causal


def _attend(q, k, v, mask):
    return aifs.attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1)


@pytest.mark.parametrize("case", ["no mask", "all ones", "padded", "decode", "chunk after cache"])
def test_mask_or_causal_gives_the_explicit_masks_result(case):
    torch.manual_seed(0)
    b, past, q_len = 2, 0, 9
    pad = None
    if case == "all ones":
        pad = torch.ones(b, q_len, dtype=torch.long)
    if case == "padded":
        pad = torch.ones(b, q_len, dtype=torch.long)
        pad[0, :3] = 0
    if case == "decode":
        past, q_len = 8, 1
    if case == "chunk after cache":
        past, q_len = 5, 4
    q = torch.randn(b, 3, q_len, 8)
    k, v = torch.randn(b, 3, past + q_len, 8), torch.randn(b, 3, past + q_len, 8)
    got = attention_mask_or_causal(pad, b, q_len, past, "cpu")
    assert (got is None) == (case in ("no mask", "all ones", "decode"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask_4d(pad, b, q_len, past, "cpu"))
    assert torch.allclose(_attend(q, k, v, got), ref, atol=1e-6, rtol=0)
    if case == "no mask":  # negative control: no mask and no causal flag attends the future
        assert (F.scaled_dot_product_attention(q, k, v) - ref).abs().max() > 1e-2


def test_mask_or_causal_checks_the_padding_mask_shape():
    with pytest.raises(ValueError, match="expected"):
        attention_mask_or_causal(torch.ones(2, 5, dtype=torch.long), 2, 4, 0, "cpu")
