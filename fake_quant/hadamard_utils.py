"""Hadamard matrices of order n = K * 2^m, built from mathematics, and fast transforms with them.

Constructions (all results are *normalized*: first row and first column all +1):

* Sylvester doubling gives every power of two;
* Paley I: q a prime power, q = 3 (mod 4) -> order q + 1;
* Paley II: q a prime power, q = 1 (mod 4) -> order 2(q + 1);
* Kronecker products of the above.

For ``n = K * P`` (P = 2^m) the matrix is ``H_K (x) H_P``, and ``H x`` is an O(n log P) butterfly
on the P part plus a K x K product. Normalization matters for rotation magnitude suppression:
the all-ones first column of H collects the mean of every weight row into exactly one channel.

Widths with no construction here (e.g. 13696 = 107 * 128) can use a fallback, chosen explicitly and
announced with a warning: ``"pad"`` (the smallest constructible order above n with a small K-block; the caller zero-pads)
or ``"orthogonal"`` (a seeded random orthogonal K-block times H_P: orthogonal, not Hadamard).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .galois import difference_table, prime_power, quadratic_character

log = logging.getLogger(__name__)

FALLBACKS = ("error", "pad", "orthogonal")


# ---------------------------------------------------------------------------------------------
# constructions (int8 numpy arrays, cached)
# ---------------------------------------------------------------------------------------------
def _normalize(h: np.ndarray) -> np.ndarray:
    h = h * h[0:1, :]          # columns times their first-row sign: first row all +1
    return h * h[:, 0:1]       # rows times their first-column sign: first column all +1


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    return quadratic_character(q)[difference_table(q)]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for a prime power q = 3 (mod 4): H = I + [[0, 1^T], [-1, Q]]."""
    Q = _jacobsthal(q).astype(np.int8)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int8)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + np.eye(n, dtype=np.int8)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for a prime power q = 1 (mod 4): each entry of C = [[0, 1^T], [1, Q]] becomes
    a 2x2 block: 0 -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]]."""
    Q = _jacobsthal(q).astype(np.int8)
    m = q + 1
    C = np.zeros((m, m), dtype=np.int8)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    sign_block = np.array([[1, 1], [1, -1]], dtype=np.int8)
    return np.kron(C, sign_block) + np.kron((C == 0).astype(np.int8), zero_block)


def _paley_recipe(k: int) -> tuple[str, int] | None:
    q = k - 1
    if prime_power(q) and q % 4 == 3:
        return ("paley1", q)
    if k % 2 == 0:
        q = k // 2 - 1
        if prime_power(q) and q % 4 == 1:
            return ("paley2", q)
    return None


@lru_cache(maxsize=None)
def _recipe(k: int) -> tuple | None:
    """How to build an order-k Hadamard matrix, or None if we cannot."""
    if k in (1, 2) or (k & (k - 1)) == 0:
        return ("sylvester", k)
    if k % 4:
        return None
    direct = _paley_recipe(k)
    if direct:
        return direct
    for a in range(2, int(math.isqrt(k)) + 1):
        if k % a == 0 and (a <= 2 or a % 4 == 0) and _recipe(a) and _recipe(k // a):
            return ("kron", a, k // a)
    return None


@lru_cache(maxsize=None)
def _build(k: int) -> np.ndarray:
    r = _recipe(k)
    if r is None:
        raise ValueError(f"no Hadamard construction of order {k}")
    if r[0] == "sylvester":
        h = _sylvester(k)
    elif r[0] == "paley1":
        h = _paley1(r[1])
    elif r[0] == "paley2":
        h = _paley2(r[1])
    else:
        h = np.kron(_build(r[1]), _build(r[2]))
    h = _normalize(h)
    h.setflags(write=False)
    return h


def construction(n: int) -> str:
    """Human-readable recipe, e.g. ``'148 (Paley II, q=73) x 2^7'``."""
    k, p = hadamard_factor(n)
    return f"{_describe(k)} x 2^{int(math.log2(p))}"


def _describe(k: int) -> str:
    r = _recipe(k)
    if r[0] == "sylvester":
        return str(k)
    if r[0] == "kron":
        return f"({_describe(r[1])} x {_describe(r[2])})"
    q = r[1]
    p, e = prime_power(q)
    field = f"q={q}" if e == 1 else f"q={p}^{e}"
    return f"{k} (Paley {'I' if r[0] == 'paley1' else 'II'}, {field})"


@lru_cache(maxsize=None)
def hadamard_factor(n: int) -> tuple[int, int] | None:
    """``(K, P)`` with ``n == K * P``, P a power of two, H_K constructible and K smallest;
    None when no construction exists."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        k = n // p
        if _recipe(k) is not None:
            return k, p
        p //= 2
    return None


def is_constructible(n: int) -> bool:
    return hadamard_factor(n) is not None


@lru_cache(maxsize=None)
def pad_target(n: int, max_block: int = 256) -> int:
    """The order to zero-pad n to: the smallest constructible order above n whose K-block is at
    most ``max_block`` (a nearby order with a huge K-block, e.g. 13712 = 13712 * 2^0, would make
    the online transform far slower than a slightly larger one such as 13824 = 108 * 2^7)."""
    m = n + (-n) % 4 if n > 2 else n
    while True:
        f = hadamard_factor(m)
        if f is not None and f[0] <= max_block:
            return m
        m += 4


# ---------------------------------------------------------------------------------------------
# public matrices
# ---------------------------------------------------------------------------------------------
def _unsupported(n: int) -> ValueError:
    return ValueError(
        f"no exact Hadamard matrix of order {n} can be built here (n = K * 2^m needs K = 1, 2, a "
        f"Paley order or a product of those); choose a fallback: 'pad' (zero-pad to "
        f"{pad_target(n)}) or 'orthogonal' (random orthogonal K-block x Hadamard)"
    )


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The normalized Hadamard matrix of order n (entries +-1, ``H @ H.T == n * I``)."""
    f = hadamard_factor(n)
    if f is None:
        raise _unsupported(n)
    k, p = f
    h = np.kron(_build(k), _sylvester(p)) if p > 1 else _build(k)
    return torch.from_numpy(np.array(h, copy=True)).to(device=device, dtype=dtype)


def random_hadamard_matrix(n: int, seed: int = 0, dtype: torch.dtype = torch.float64,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """Orthogonal ``diag(s) @ H / sqrt(n)`` with seeded random signs s: the residual rotation."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    q = signs[:, None] * hadamard_matrix(n) / math.sqrt(n)
    return q.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# plans and fast transforms
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HadamardPlan:
    """How to transform a last dimension of size ``n``.

    ``kind`` is ``"exact"`` (H_K (x) H_P of order n), ``"pad"`` (inputs are zero-padded to
    ``out_dim`` and transformed with an exact matrix of that order) or ``"orthogonal"``
    (``sqrt(K) * Q_K (x) H_P`` with a seeded random orthogonal Q_K: orthogonal up to scale, but
    neither +-1 nor normalized). ``block`` is the K x K factor.
    """

    n: int
    out_dim: int
    k: int
    p: int
    kind: str
    block: torch.Tensor  # float64 [k, k]
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # per dtype/device factors

    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """Dense ``out_dim x out_dim`` matrix M with ``transform(x) == pad(x) @ M.T / sqrt(out_dim)``."""
        m = torch.kron(self.block, torch.from_numpy(_sylvester(self.p)).double())
        return m.to(device=device, dtype=dtype)


@lru_cache(maxsize=None)
def get_plan(n: int, fallback: str = "error", seed: int = 0) -> HadamardPlan:
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown Hadamard fallback {fallback!r}; use one of {FALLBACKS}")
    f = hadamard_factor(n)
    if f is not None:
        k, p = f
        return HadamardPlan(n, n, k, p, "exact", torch.from_numpy(_build(k).astype(np.float64)))
    if fallback == "error":
        raise _unsupported(n)
    if fallback == "pad":
        m = pad_target(n)
        k, p = hadamard_factor(m)
        msg = (f"Hadamard fallback: no exact order {n}; zero-padding to {m} "
               f"(+{100 * (m - n) / n:.1f}% work, {construction(m)})")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        return HadamardPlan(n, m, k, p, "pad", torch.from_numpy(_build(k).astype(np.float64)))
    p = n & -n
    k = n // p
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a uniformly (Haar) distributed orthogonal matrix
    msg = (f"Hadamard fallback: no exact order {n}; using a random orthogonal {k}x{k} block "
           f"(seed {seed}) x Hadamard {p}: orthogonal but not +-1, so rotation magnitude "
           f"suppression cannot concentrate row means for this width")
    warnings.warn(msg, stacklevel=2)
    log.warning(msg)
    return HadamardPlan(n, n, k, p, "orthogonal", (q * math.sqrt(k)).contiguous())


MAX_FACTOR_BITS = 7  # power-of-two factors of at most 128: small dense products beat butterflies on CPUs


def _power_of_two_factors(p: int) -> list[int]:
    """Split 2^m into the fewest, most balanced factors of at most 2^MAX_FACTOR_BITS."""
    m = int(math.log2(p))
    if m == 0:
        return []
    stages = -(-m // MAX_FACTOR_BITS)
    bits = [m // stages + (1 if i < m % stages else 0) for i in range(stages)]
    return [2**b for b in bits]


def _factor_matrices(plan: HadamardPlan, dtype: torch.dtype, device: torch.device, scale: float) -> list[torch.Tensor]:
    """[H_K, H_P1, H_P2, ...] with H_P = H_P1 (x) H_P2 (x) ... (Sylvester matrices factor this way);
    ``scale`` is folded into the first factor so normalizing costs no extra pass."""
    key = (dtype, str(device), scale)
    if key not in plan.cache:
        mats = [plan.block] if plan.k > 1 else []
        mats += [torch.from_numpy(_sylvester(f)).double() for f in _power_of_two_factors(plan.p)]
        mats = mats or [torch.ones(1, 1, dtype=torch.float64)]
        mats[0] = mats[0] * scale
        plan.cache[key] = [m.to(device=device, dtype=dtype) for m in mats]
    return plan.cache[key]


def _kronecker_transform(x2d: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """``x2d @ (A (x) B (x) ...).T`` as one small GEMM per factor: apply the factor of the last
    axis, then rotate that axis to the front; after all factors the axis order is the original."""
    rows, n = x2d.shape
    y = x2d
    for m in reversed(mats):
        f = m.shape[0]
        y = y.reshape(-1, f) @ m.t()
        y = y.reshape(rows, -1, f).transpose(1, 2).contiguous()
    return y.reshape(rows, n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester-Hadamard transform of the last dimension (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    y = x.reshape(-1, n)
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


@lru_cache(maxsize=1)
def _fast_kernel():
    """fast_hadamard_transform's CUDA kernel if installed, else None (imported lazily, once)."""
    try:
        from fast_hadamard_transform import hadamard_transform as kernel  # type: ignore
    except Exception:  # not installed, or built for another CUDA
        return None
    return kernel


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fast_hadamard_transform refuses others


def _kernel_applies(x: torch.Tensor, plan: HadamardPlan) -> bool:
    """Whether the CUDA kernel can take this input: on a GPU, a dtype it supports (the offline
    rotation of weights runs in float64, which only the torch path handles) and a 2^m factor in
    its range."""
    return x.is_cuda and x.dtype in KERNEL_DTYPES and 1 < plan.p <= 32768


def hadamard_transform(x: torch.Tensor, normalize: bool = True, plan: HadamardPlan | None = None,
                       fallback: str = "error") -> torch.Tensor:
    """``x @ H.T`` (divided by sqrt(n) when ``normalize``) along the last dimension, for any
    supported n and any leading shape. With a ``"pad"`` plan the output is ``plan.out_dim`` wide."""
    n = x.shape[-1]
    plan = plan or get_plan(n, fallback)
    if plan.n != n:
        raise ValueError(f"plan is for width {plan.n}, input has {n}")
    if plan.out_dim != n:
        x = torch.nn.functional.pad(x, (0, plan.out_dim - n))
    lead = x.shape[:-1]
    scale = 1.0 / math.sqrt(plan.out_dim) if normalize else 1.0
    kernel = _fast_kernel() if _kernel_applies(x, plan) else None
    if kernel is not None:  # CUDA kernel for the 2^m part, one GEMM for the K-block
        y = kernel(x.reshape(-1, plan.k, plan.p).contiguous(), scale)
        if plan.k > 1:
            y = torch.matmul(plan.block.to(device=y.device, dtype=y.dtype), y)
    else:
        y = _kronecker_transform(x.reshape(-1, plan.out_dim), _factor_matrices(plan, x.dtype, x.device, scale))
    return y.reshape(*lead, plan.out_dim)


class OnlineHadamard(nn.Module):
    """Applies the normalized Hadamard transform to the last dimension at run time (the online
    half of a rotation whose other half was folded into the next weight). ``fp32=True`` computes
    it in float32 whatever the input dtype."""

    def __init__(self, n: int, fp32: bool = False, fallback: str = "error") -> None:
        super().__init__()
        self.n = n
        self.fp32 = fp32
        self.plan = get_plan(n, fallback)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and x.dtype != torch.float32:
            return hadamard_transform(x.float(), plan=self.plan).to(x.dtype)
        return hadamard_transform(x, plan=self.plan)

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.plan.kind}, K={self.plan.k}, fp32={self.fp32}"
