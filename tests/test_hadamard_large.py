"""Hadamard orders beyond Sylvester and Paley: 268, 428 (Goethals-Seidel), 1076 (Miyamoto) and the
model widths they give, 13696 = 428 * 2^5 (GLM-4-9B MLP) and 4304 = 1076 * 2^2 (SigLIP-so400m fc2)."""
import hashlib
import math
import warnings

import numpy as np
import pytest
import torch

from fake_quant import hadamard_data
from fake_quant import hadamard_utils as hu
from fake_quant import rotation_utils as ru
from fake_quant.quant_utils import QuantLinear
from fake_quant.rms import SplitQuantLinear
from fake_quant.spec import get
from model import qwen2vl, tiny

# SHA-256 of the unnormalized int8 matrices built by the published recipes (circulant
# M[i, j] = row[(j - i) mod t], the Goethals-Seidel array with the back-identity, the Paley
# conference matrix C[1 + i, 1 + j] = chi(i - j), Miyamoto's block table), computed independently
REFERENCE_SHA256 = {
    428: "f246baecb87a38baa3a649ee06dd9cb66eae9fb034b110f16319045ccb0152d2",
    268: "375e6b0f43b4135005b17485bebcdad80008602fff6a7587e1de34ff8f8e43aa",
    1076: "bcaa1833c962ec023f7b91330b9537d79d3790cd2b70b2bd72e7db320cd8f943",
}
DOWN = "model.language_model.layers.{}.mlp.down_proj"


def sha256(h: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(h, dtype=np.int8).tobytes()).hexdigest()


def is_hadamard(h: np.ndarray) -> bool:
    f = np.asarray(h, dtype=np.float64)  # +-1 products: exact integers in float64 BLAS
    n = len(f)
    return bool(np.all(np.abs(f) == 1)) and np.array_equal(f @ f.T, n * np.eye(n))


def raw_matrices() -> dict[int, np.ndarray]:
    h268 = hu.goethals_seidel_from_t_matrices(67)
    return {428: hu.goethals_seidel_from_t_matrices(107), 268: h268,
            1076: hu.miyamoto(hu.paley_conference(269), h268)}


# ---- the data and each assembly step ---------------------------------------------------------
def test_stored_sequences_satisfy_their_defining_identities():
    x, y, z, w = (hu.signs(s) for s in hadamard_data.TURYN_36)
    assert [len(v) for v in (x, y, z, w)] == [36, 36, 36, 35]
    n = lambda v: np.pad(hu.nonperiodic_autocorrelation(v), (0, 36 - len(v)))  # noqa: E731
    assert not np.any((n(x) + n(y) + 2 * n(z) + 2 * n(w))[1:])
    base = hu.base_sequences_from_turyn(x, y, z, w)
    assert [len(v) for v in base] == [71, 71, 36, 36]
    assert not np.any(sum(np.pad(hu.nonperiodic_autocorrelation(v), (0, 71 - len(v))) for v in base)[1:])
    ts = hu.t_sequences_from_base(*base)
    assert all(len(t) == 107 for t in ts) and np.array_equal(sum(np.abs(t) for t in ts), np.ones(107))
    # T-sequences and Sawade's T-matrices: sum X_i X_i^T = t I for their circulants
    for t, rows in ((107, ts), (67, [hu.signs(s) for s in hadamard_data.T_MATRICES_67])):
        gram = sum(hu.circulant(r) @ hu.circulant(r).T for r in rows)
        assert np.array_equal(gram, t * np.eye(t, dtype=np.int64))
        a, b, c, d = hu.goethals_seidel_rows_from_t_matrices(*rows)
        assert all(np.all(np.abs(r) == 1) for r in (a, b, c, d))
        assert np.array_equal(sum(hu.circulant(r) @ hu.circulant(r).T for r in (a, b, c, d)), 4 * t * np.eye(t))


def test_corrupted_data_is_refused_at_every_step():
    """Negative controls: one flipped sign breaks each defining identity, and the assembly says so
    instead of returning a matrix that is not Hadamard."""
    x, y, z, w = (hu.signs(s) for s in hadamard_data.TURYN_36)
    bad = x.copy()
    bad[5] *= -1
    with pytest.raises(ValueError, match="not Turyn-type"):
        hu.base_sequences_from_turyn(bad, y, z, w)
    a, b, c, d = hu.base_sequences_from_turyn(x, y, z, w)
    with pytest.raises(ValueError, match="not base sequences"):
        hu.t_sequences_from_base(a, b, -bad, d)
    rows = [hu.signs(s) for s in hadamard_data.T_MATRICES_67]
    broken = rows[0].copy()
    broken[0] = -broken[0]
    with pytest.raises(ValueError, match="not T-matrices"):
        hu.goethals_seidel_rows_from_t_matrices(broken, *rows[1:])
    gs = list(hu.goethals_seidel_rows_from_t_matrices(*rows))
    gs[2] = gs[2].copy()
    gs[2][10] *= -1
    with pytest.raises(ValueError, match="unsuitable for the Goethals-Seidel array"):
        hu.goethals_seidel(*gs)
    # the array itself is what makes the product work: plain circulants side by side are not Hadamard
    A, B, C, D = (hu.circulant(r) for r in hu.goethals_seidel_rows_from_t_matrices(*rows))
    assert not is_hadamard(np.block([[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]))


@pytest.mark.parametrize("order", [428, 268, 1076])
def test_published_recipes_reproduce_the_reference_matrices(order):
    h = raw_matrices()[order]
    assert h.shape == (order, order) and is_hadamard(h)
    assert sha256(h) == REFERENCE_SHA256[order]
    assert not (np.all(h[0] == 1) and np.all(h[:, 0] == 1))  # published form: not normalized
    if order != 1076:  # the library's 1076 starts from the normalized 268, a different matrix
        # the library's matrix is the published one with rows and columns negated: the entrywise
        # product of the two is a rank-one sign pattern r_i c_j
        prod = hu._build(order).astype(np.int64) * h
        assert np.array_equal(prod, np.outer(prod[:, 0], prod[0, :]) * prod[0, 0])


@pytest.mark.parametrize("q", [5, 9, 13, 25, 29, 37, 81])
def test_miyamoto_for_small_and_prime_power_q(q):
    """Any Hadamard matrix of order q - 1 works, not only a normalized one: a signed row and column
    permutation of it gives another Hadamard matrix of order 4q."""
    k = hu.hadamard_matrix(q - 1).numpy().astype(np.int64)
    assert is_hadamard(hu.miyamoto(hu.paley_conference(q), k))
    g = np.random.default_rng(q)
    scrambled = (k[g.permutation(q - 1)][:, g.permutation(q - 1)] * g.choice([-1, 1], q - 1)[:, None]
                 * g.choice([-1, 1], q - 1)[None, :])
    assert is_hadamard(hu.miyamoto(hu.paley_conference(q), scrambled))
    with pytest.raises(ValueError, match="symmetric conference matrix"):
        c = hu.paley_conference(q).astype(np.int64)
        c[1, 2], c[2, 1] = -c[1, 2], c[2, 1]  # no longer symmetric
        hu.miyamoto(c, k)


@pytest.mark.parametrize("k", [268, 428, 1076])
def test_k_blocks_are_exact_and_normalized(k):
    assert hu.hadamard_factor(k) == (k, 1)
    h = hu.hadamard_matrix(k).numpy()
    assert is_hadamard(h)
    assert np.all(h[0] == 1) and np.all(h[:, 0] == 1)


def test_factorizations_and_descriptions_of_the_model_widths():
    assert hu.hadamard_factor(13696) == (428, 32) and hu.hadamard_factor(4304) == (1076, 4)
    assert "Goethals-Seidel" in hu.construction(13696) and hu.construction(13696).endswith("x 2^5")
    assert hu.construction(4304).startswith("1076 (Miyamoto, q=269, with 268 (Goethals-Seidel")
    for n in (13696, 4304):
        plan = hu.get_plan(n)
        assert plan.kind == "exact" and plan.out_dim == n


def test_widths_the_classic_constructions_reach_keep_their_matrices():
    """Miyamoto reaches 116 = 4 * 29, so 464 = 116 * 2^2 now has a smaller K-block than its Paley I
    one (q = 463); the Paley one stays, so the rotation of a 464-wide layer is what it was."""
    assert hu._recipe(116)[0] == "miyamoto"
    assert hu.hadamard_factor(464) == (464, 1) and hu._recipe(464)[0] == "paley1"


def test_k_blocks_build_fast_and_once():
    """The K-block is built once per process (the plan and every transform reuse it); building it
    costs milliseconds, so it never dominates a run."""
    import time

    hu._build.cache_clear()
    t0 = time.perf_counter()
    blocks = [hu._build(k) for k in (428, 1076)]
    assert time.perf_counter() - t0 < 2.0  # measured: about 0.03 s for both on two CPU cores
    assert all(hu._build(k) is b for k, b in zip((428, 1076), blocks))


# ---- full matrices and the fast transform ----------------------------------------------------
@pytest.fixture(scope="module")
def h13696() -> torch.Tensor:
    return hu.hadamard_matrix(13696, dtype=torch.float32)


def test_4304_is_hadamard_and_normalized_as_a_dense_float32_product():
    h = hu.hadamard_matrix(4304, dtype=torch.float32)
    assert torch.all(h.abs() == 1) and torch.all(h[0] == 1) and torch.all(h[:, 0] == 1)
    # integer entries, |partial sums| <= 4304 < 2^24: the float32 product is exact
    assert torch.equal(h @ h.t(), 4304 * torch.eye(4304))


def test_13696_is_hadamard_and_normalized(h13696):
    """The full Gram matrix H H^T in float32, each entry exact (|partial sums| <= 13696 < 2^24),
    with H^T applied in its Kronecker factors (one dense 13696^3 product takes 15-30 s on two CPU
    cores; ``test_13696_dense_float32_product`` does that one under -m slow)."""
    h = h13696
    assert torch.all(h.abs() == 1) and torch.all(h[0] == 1) and torch.all(h[:, 0] == 1)
    k, p = hu.hadamard_factor(13696)
    block = torch.from_numpy(hu._build(k).astype(np.float32))
    syl = torch.from_numpy(hu._sylvester(p).astype(np.float32))
    hv = h.view(k, p, k, p)  # H[i p + a, j p + b] = H_K[i, j] H_P[a, b], one block row at a time
    assert all(torch.equal(hv[i], block[i][None, :, None] * syl[:, None, :]) for i in range(k))
    gram = hu.hadamard_transform(h, normalize=False)  # = H @ (H_K (x) H_P)^T = H @ H^T
    assert torch.equal(gram.diagonal(), torch.full((13696,), 13696.0))
    assert int(torch.count_nonzero(gram)) == 13696


@pytest.mark.slow
def test_13696_dense_float32_product(h13696):
    gram = h13696 @ h13696.t()
    assert torch.equal(gram.diagonal(), torch.full((13696,), 13696.0))
    assert int(torch.count_nonzero(gram)) == 13696


@pytest.mark.parametrize("n", [4304, 13696])
def test_fast_transform_equals_the_dense_product(n, h13696):
    h = h13696 if n == 13696 else hu.hadamard_matrix(n, dtype=torch.float32)
    g = torch.Generator().manual_seed(n)
    # small integer inputs: both sides are exact in float32, so they must agree bit for bit
    x = torch.randint(-3, 4, (2, 3, n), generator=g).float()
    assert torch.equal(hu.hadamard_transform(x, normalize=False), x @ h.t())
    xf = torch.randn(5, n, generator=g)
    dense = (xf.double() @ h.t().double()) / math.sqrt(n)
    assert torch.allclose(hu.hadamard_transform(xf).double(), dense, atol=1e-5, rtol=0)
    assert torch.allclose(hu.hadamard_transform(xf.double()), dense, atol=1e-12, rtol=0)


# ---- a rotated tiny model and RMS at these widths --------------------------------------------
def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("width", [4304, 13696])
def test_rotated_model_with_a_wide_mlp_is_invariant_without_fallback(width):
    model = tiny.qwen2vl_model(seed=7, text={"intermediate_size": width})
    inputs = tiny.qwen2vl_inputs()
    ref = logits(model, inputs)
    opts = {"visual": ru.RotationOptions(seed=1, online_hadamard=True),
            "llm": ru.RotationOptions(seed=2, online_hadamard=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        report = ru.rotate(model, qwen2vl.stacks(model), opts)
    assert len(report["llm"]["online_hadamard"]) == 2
    down = get(model, DOWN.format(0))
    assert isinstance(down, QuantLinear) and down.use_online_rotation and down.in_features == width
    assert down.online_rotation.plan.kind == "exact" and down.online_rotation.plan.k == hu.hadamard_factor(width)[0]
    assert rel_diff(logits(model, inputs), ref) < 1e-4
    # negative control: without the online half of the rotation the folded weight is wrong
    down.use_online_rotation = False
    assert rel_diff(logits(model, inputs), ref) > 1e-2


@pytest.mark.parametrize("width", [4304, 13696])
def test_rms_splits_exactly_one_channel_at_these_widths(width):
    # pure row means land in column 0 alone ...
    c = torch.randn(6, 1, dtype=torch.float64)
    folded = hu.hadamard_transform(c.expand(6, width).contiguous())
    assert torch.allclose(folded[:, 0], c[:, 0] * math.sqrt(width))
    assert folded[:, 1:].abs().max() < 1e-10
    # ... which needs the normalized matrix: the published, unnormalized K-block spreads them
    k, p = hu.hadamard_factor(width)
    raw = hu.HadamardPlan(width, width, k, p, "exact", torch.from_numpy(raw_matrices()[k].astype(np.float64)))
    spread = hu.hadamard_transform(c.expand(6, width).contiguous(), plan=raw)
    assert int(torch.count_nonzero(spread[0].abs() > 1e-10)) > 1

    # a tiny model whose down_proj rows carry a large mean: RMS splits channel 0 and stays exact
    model = tiny.qwen2vl_model(seed=8, text={"intermediate_size": width})
    g = torch.Generator().manual_seed(width)
    with torch.no_grad():
        for i in range(2):
            wt = get(model, DOWN.format(i)).weight
            wt.add_(0.05 * torch.randn(wt.shape[0], 1, generator=g).sign())
    W0 = get(model, DOWN.format(0)).weight.detach().double().clone()
    inputs = tiny.qwen2vl_inputs()
    ref = logits(model, inputs)
    reports = {}
    ru.add_online_hadamard(model, qwen2vl.stacks(model)[1], split=True, split_reports=reports)
    layer = get(model, DOWN.format(0))
    assert isinstance(layer, SplitQuantLinear) and reports[DOWN.format(0)]["rows_meeting_condition"] == 1.0
    assert layer.branch.weight.shape[1] == 1 and layer.main.weight.shape[1] == width - 1
    assert torch.allclose(layer.branch.weight[:, 0].double(), W0.mean(1) * math.sqrt(width), atol=1e-5)
    # the mean left the main part: its rows are the rotated zero-mean remainder, much smaller
    assert reports[DOWN.format(0)]["scale_reduction"] > 3
    assert rel_diff(logits(model, inputs), ref) <= 1e-5
