import math

import numpy as np
import pytest
import torch

from fake_quant import hadamard_utils as hu
from fake_quant.galois import irreducible_poly, prime_power, quadratic_character

WIDTHS = [384, 576, 1152, 1280, 1536, 1664, 1792, 3420, 3584, 4096, 4304, 4864, 5120, 8192, 8960, 11008,
          13696, 14336, 15360, 18944, 27648, 29568]
EXPECTED_K = {18944: 148, 11008: 344, 29568: 924, 3420: 3420, 4096: 1, 8960: 140, 13696: 428, 4304: 1076}


@pytest.mark.parametrize("n", WIDTHS)
def test_every_model_width_is_exact_and_normalized(n):
    k, p = hu.hadamard_factor(n)
    assert k * p == n and p & (p - 1) == 0
    if n in EXPECTED_K:
        assert k == EXPECTED_K[n]
    # the K-block: an exact integer Hadamard matrix, normalized (float64 products of +-1 entries are
    # exact integers, and far faster than int64 ones)
    hk = torch.from_numpy(hu._build(k).astype(np.float64))
    assert torch.equal(hk @ hk.t(), k * torch.eye(k, dtype=torch.float64))
    assert torch.all(hk[0] == 1) and torch.all(hk[:, 0] == 1)
    # rows of the full matrix: H = H_K (x) H_P, checked through the unnormalized transform in
    # float64 (exact on integers): rows_i(H) @ H.T == n * e_i
    rows = torch.tensor(sorted({0, 1, n // 2, n - 1, (7 * n) // 11}))
    hrows = torch.stack([torch.kron(hk[r // p].double(), torch.from_numpy(hu._sylvester(p)[r % p]).double())
                         for r in rows.tolist()])
    assert torch.all(hrows[0] == 1) and torch.all(hrows[:, 0] == 1)
    gram = hu.hadamard_transform(hrows, normalize=False)
    expected = torch.zeros(len(rows), n, dtype=torch.float64)
    expected[torch.arange(len(rows)), rows] = n
    assert torch.equal(gram, expected)


@pytest.mark.parametrize("n", [12, 20, 28, 36, 52, 148, 268, 384, 428, 1076, 1664, 1792])
def test_full_matrix_identity(n):
    h = hu.hadamard_matrix(n, dtype=torch.float64)
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))
    assert torch.all(h.abs() == 1)
    assert torch.all(h[0] == 1) and torch.all(h[:, 0] == 1)


@pytest.mark.parametrize("n", [64, 96, 384, 1280, 3584, 4304, 8960, 13696, 18944, 29568])
@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_fast_transform_matches_dense_product(n, lead):
    x = torch.randn(*lead, n)
    y = hu.hadamard_transform(x)
    assert y.shape == x.shape
    if n <= 8960:
        dense = x.double() @ hu.hadamard_matrix(n).t() / math.sqrt(n)
        assert torch.allclose(y.double(), dense, atol=1e-5, rtol=0)
    else:  # the dense matrix would be GBs: compare a subset of output columns against dense rows
        k, p = hu.hadamard_factor(n)
        hk, hp = hu._build(k), hu._sylvester(p)
        cols = [0, 1, 5, n // 3, n - 1]
        rows = torch.stack([torch.from_numpy(np.kron(hk[c // p], hp[c % p]).astype(np.float64)) for c in cols])
        dense = x.double() @ rows.t() / math.sqrt(n)
        assert torch.allclose(y.double()[..., cols], dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [64, 96, 8960, 20480])  # factors: 64; 12, 8; 140, 64; 20, 32, 32
def test_rows_in_blocks_match_one_block(monkeypatch, n):
    x = torch.randn(7, n, dtype=torch.float64)
    whole = hu.hadamard_transform(x)
    monkeypatch.setattr(hu, "ROW_BLOCK_ELEMENTS", 3 * n)  # blocks of 3, 3 and 1 rows
    blocks = hu.hadamard_transform(x)
    assert torch.allclose(blocks, whole, atol=1e-12, rtol=0)
    k, p = hu.hadamard_factor(n)
    rows = torch.stack([torch.from_numpy(np.kron(hu._build(k)[c // p], hu._sylvester(p)[c % p])) for c in (0, n - 1)])
    assert torch.allclose(blocks[:, [0, n - 1]], x @ rows.double().t() / math.sqrt(n), atol=1e-12, rtol=0)


def test_transform_preserves_norm_and_inverts():
    x = torch.randn(5, 1152, dtype=torch.float64)
    y = hu.hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    # H^T undoes H: x = H^T (H x) / n; the transform of y's with the transposed block does it
    h = hu.hadamard_matrix(1152)
    assert torch.allclose(y @ h / math.sqrt(1152), x)


def test_first_channel_collects_the_mean():
    # RMS depends on this: (W H)[:, 0] / sqrt(d) == sqrt(d) * mean(W, dim=1) for every K
    for n in (384, 1664, 18944):
        w = torch.randn(4, n, dtype=torch.float64) + 0.3
        wh = hu.hadamard_transform(w)  # = W @ H.T / sqrt(n); column 0 of H.T is row 0 of H = ones
        assert torch.allclose(wh[:, 0], math.sqrt(n) * w.mean(dim=1))


def test_random_hadamard_is_orthogonal_and_seeded():
    q = hu.random_hadamard_matrix(1280, seed=3)
    assert torch.allclose(q @ q.t(), torch.eye(1280, dtype=torch.float64), atol=1e-10)
    assert torch.equal(q, hu.random_hadamard_matrix(1280, seed=3))
    assert not torch.equal(q, hu.random_hadamard_matrix(1280, seed=4))
    assert torch.allclose(q.abs(), torch.full_like(q, 1 / math.sqrt(1280)))


# 668 = 4 * 167 is the smallest order with no known Hadamard matrix; 716 * 2^5 = 22912 is a model-
# sized width that none of the constructions here reaches
@pytest.mark.parametrize("n,target,below,above", [(668, 672, 664, 672), (22912, 23040, 22908, 22936)])
def test_unsupported_widths_error_or_fall_back_with_a_warning(n, target, below, above):
    assert not hu.is_constructible(n)
    assert hu.nearest_constructible(n) == (below, above)
    assert hu.is_constructible(below) and hu.is_constructible(above)
    assert not any(hu.is_constructible(m) for m in range(below + 1, above))
    with pytest.raises(ValueError, match=f"no exact Hadamard matrix of order {n}.*"
                                         f"nearest constructible widths: {below} .* below, {above} .* above.*'pad'"):
        hu.hadamard_matrix(n)
    with pytest.raises(ValueError, match="choose a fallback"):
        hu.hadamard_transform(torch.randn(2, n))
    hu.get_plan.cache_clear()
    with pytest.warns(UserWarning, match="zero-padding to"):
        plan = hu.get_plan(n, "pad")
    assert plan.out_dim == target and plan.kind == "pad"
    x = torch.randn(3, n, dtype=torch.float64)
    y = hu.hadamard_transform(x, plan=plan)
    assert y.shape == (3, target)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))  # zero padding loses nothing
    with pytest.warns(UserWarning, match="random orthogonal"):
        orth = hu.get_plan(n, "orthogonal", seed=1)
    y = hu.hadamard_transform(x, plan=orth)
    assert y.shape == x.shape
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))


def test_orthogonal_fallback_matches_its_dense_matrix():
    n = 668  # 4 * 167: no Hadamard matrix of this order is known
    with pytest.warns(UserWarning, match="random orthogonal 167x167 block"):
        plan = hu.get_plan(n, "orthogonal", seed=2)
    m = plan.matrix()
    assert torch.allclose(m @ m.t(), n * torch.eye(n, dtype=torch.float64), atol=1e-8)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(hu.hadamard_transform(x, plan=plan), x @ m.t() / math.sqrt(n))


def test_online_hadamard_module_fp32_and_dtype():
    mod = hu.OnlineHadamard(96, fp32=True)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    y = mod(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), hu.hadamard_transform(x.float()), atol=2e-2)


def test_fwht_rejects_other_lengths():
    with pytest.raises(ValueError, match="power-of-two"):
        hu.fwht(torch.randn(3, 12))


def test_finite_fields():
    assert prime_power(343) == (7, 3) and prime_power(25) == (5, 2) and prime_power(12) is None
    # half of the nonzero elements are squares, and -1 is a square iff q = 1 (mod 4)
    for q in (7, 11, 13, 25, 27, 49, 343):
        chi = quadratic_character(q)
        assert (chi == 1).sum() == (chi == -1).sum() == (q - 1) // 2
    m = irreducible_poly(7, 3)
    assert len(m) == 4 and m[-1] == 1
    # no root in GF(7): a cubic without roots is irreducible
    assert all(sum(c * x**i for i, c in enumerate(m)) % 7 for x in range(7))


def test_cuda_kernel_only_takes_dtypes_it_supports():
    """fast_hadamard_transform handles fp32/fp16/bf16; the offline rotation transforms float64
    weights, which must stay on the torch path (seen failing on an H200 before this rule)."""
    from types import SimpleNamespace

    plan = hu.get_plan(3584)
    on_gpu = [hu._kernel_applies(SimpleNamespace(is_cuda=True, dtype=d), plan)
              for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]
    assert on_gpu == [True, True, True, False]
    assert not hu._kernel_applies(SimpleNamespace(is_cuda=False, dtype=torch.float32), plan)
    assert not hu._kernel_applies(SimpleNamespace(is_cuda=True, dtype=torch.float32), hu.get_plan(12))  # no 2^m part


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_transform_on_cuda_matches_the_matrix(dtype):
    n = 3584
    x = torch.randn(8, n, dtype=torch.float64, device="cuda")
    ref = x @ hu.hadamard_matrix(n, device="cuda").T / n**0.5
    out = hu.hadamard_transform(x.to(dtype)).double()
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert float((out - ref).abs().max() / ref.abs().max()) < tol
