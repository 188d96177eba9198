"""Which linears of a block share an input (and are GPTQ-calibrated together)."""
import torch
from torch import nn

from fake_quant.pipeline import execution_groups


class _Chain(nn.Module):
    """a and b read different temporaries (the first is freed before the second exists); c reads x."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        y = self.a(x * 1.0)
        h = y * 1.0
        return self.b(h) + self.c(h) + self.d(x)


def test_groups_follow_shared_inputs_not_reused_ids():
    m = _Chain()
    layers = {"a": m.a, "b": m.b, "c": m.c, "d": m.d}
    for _ in range(5):  # a freed temporary's id is typically reused by the next one
        assert execution_groups(m, layers, (torch.randn(2, 4),), {}) == [["a"], ["b", "c"], ["d"]]


def test_layers_never_called_come_last():
    m = _Chain()
    layers = {"a": m.a, "b": m.b, "c": m.c, "d": m.d, "unused": nn.Linear(4, 4)}
    assert execution_groups(m, layers, (torch.randn(2, 4),), {})[-1] == ["unused"]
