"""Hadamard matrices of order n = K * 2^m, built from mathematics, and fast transforms with them.

Constructions (all results are *normalized*: first row and first column all +1):

* Sylvester doubling gives every power of two;
* Paley I: q a prime power, q = 3 (mod 4) -> order q + 1;
* Paley II: q a prime power, q = 1 (mod 4) -> order 2(q + 1);
* Kronecker products of the above;
* the Goethals-Seidel array of four circulants from published T-matrices: order 428 = 4 * 107
  (T-sequences from the Turyn-type sequences of Kharaghani and Tayfeh-Rezaie) and 268 = 4 * 67
  (Sawade's T-matrices);
* Miyamoto's construction: q a prime power, q = 1 (mod 4), with a Hadamard matrix of order q - 1
  -> order 4q (e.g. 1076 = 4 * 269 from 268);
* Kronecker products that need the last two.

For ``n = K * P`` (P = 2^m) the matrix is ``H_K (x) H_P``, and ``H x`` is an O(n log P) butterfly
on the P part plus a K x K product. Normalization matters for rotation magnitude suppression:
the all-ones first column of H collects the mean of every weight row into exactly one channel.

Every width of the supported models is exact (13696 = 428 * 2^5, 4304 = 1076 * 2^2). Widths with
no construction here (e.g. 668 = 4 * 167, an order for which no Hadamard matrix is known) can use
a fallback, chosen explicitly and announced with a warning: ``"pad"`` (the smallest constructible
order above n with a small K-block; the caller zero-pads) or ``"orthogonal"`` (a seeded random
orthogonal K-block times H_P: orthogonal, not Hadamard).
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

from . import hadamard_data
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


def paley_conference(q: int) -> np.ndarray:
    """The normalized Paley conference matrix of order q + 1 (q a prime power): ``[[0, 1^T], [1, Q]]``
    with ``Q[a, b] = chi(a - b)``. ``C C^T == q I``; symmetric when q = 1 (mod 4)."""
    Q = _jacobsthal(q).astype(np.int8)
    C = np.zeros((q + 1, q + 1), dtype=np.int8)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    return C


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for a prime power q = 1 (mod 4): each entry of the conference matrix C becomes
    a 2x2 block: 0 -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]]."""
    C = paley_conference(q)
    zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    sign_block = np.array([[1, 1], [1, -1]], dtype=np.int8)
    return np.kron(C, sign_block) + np.kron((C == 0).astype(np.int8), zero_block)


# ---- Goethals-Seidel array, T-sequences, Miyamoto -------------------------------------------
def signs(s: str) -> np.ndarray:
    """A sequence written with ``+``, ``-`` and ``0`` as an int64 vector."""
    table = {"+": 1, "-": -1, "0": 0}
    return np.array([table[c] for c in s], dtype=np.int64)


def nonperiodic_autocorrelation(a: np.ndarray) -> np.ndarray:
    """``N_a(s) = sum_i a_i a_(i+s)`` for s = 0 .. len(a) - 1."""
    a = np.asarray(a, dtype=np.int64)
    return np.array([int(a[: len(a) - s] @ a[s:]) for s in range(len(a))], dtype=np.int64)


def periodic_autocorrelation(a: np.ndarray) -> np.ndarray:
    """``P_a(s) = sum_i a_i a_((i+s) mod t)`` for s = 0 .. t - 1."""
    a = np.asarray(a, dtype=np.int64)
    return np.array([int(a @ np.roll(a, -s)) for s in range(len(a))], dtype=np.int64)


def _nonperiodic_sum(seqs: list[np.ndarray], weights: list[int]) -> np.ndarray:
    n = max(len(x) for x in seqs)
    total = np.zeros(n, dtype=np.int64)
    for x, w in zip(seqs, weights):
        na = nonperiodic_autocorrelation(x)
        total[: len(na)] += w * na
    return total


def base_sequences_from_turyn(x: np.ndarray, y: np.ndarray, z: np.ndarray, w: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Turyn-type sequences (lengths n, n, n, n - 1) -> base sequences of lengths 2n - 1, 2n - 1, n, n:
    ``(Z;W, Z;-W, X, Y)``. The weights 1, 1, 2, 2 of the Turyn condition are what the two
    concatenations contribute, so the four new autocorrelations sum to zero."""
    x, y, z, w = (np.asarray(v, dtype=np.int64) for v in (x, y, z, w))
    n = len(x)
    if not (len(y) == len(z) == n and len(w) == n - 1):
        raise ValueError(f"Turyn-type sequences have lengths n, n, n, n - 1; got {[len(v) for v in (x, y, z, w)]}")
    if np.any(_nonperiodic_sum([x, y, z, w], [1, 1, 2, 2])[1:]):
        raise ValueError("not Turyn-type: N_X + N_Y + 2 N_Z + 2 N_W is nonzero at some shift")
    return np.concatenate([z, w]), np.concatenate([z, -w]), x, y


def t_sequences_from_base(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Base sequences (lengths m, m, n, n) -> T-sequences of length m + n:
    ``((A+B)/2 ; 0_n), ((A-B)/2 ; 0_n), (0_m ; (C+D)/2), (0_m ; (C-D)/2)``. Halving keeps the
    autocorrelation sum zero (N_(A+B) + N_(A-B) = 2 (N_A + N_B)) and makes the supports disjoint."""
    a, b, c, d = (np.asarray(v, dtype=np.int64) for v in (a, b, c, d))
    m, n = len(a), len(c)
    if len(b) != m or len(d) != n:
        raise ValueError("base sequences have lengths m, m, n, n")
    if np.any(_nonperiodic_sum([a, b, c, d], [1, 1, 1, 1])[1:]):
        raise ValueError("not base sequences: N_A + N_B + N_C + N_D is nonzero at some shift")
    zm, zn = np.zeros(m, dtype=np.int64), np.zeros(n, dtype=np.int64)
    return (np.concatenate([(a + b) // 2, zn]), np.concatenate([(a - b) // 2, zn]),
            np.concatenate([zm, (c + d) // 2]), np.concatenate([zm, (c - d) // 2]))


def goethals_seidel_rows_from_t_matrices(x1: np.ndarray, x2: np.ndarray, x3: np.ndarray, x4: np.ndarray
                                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First rows of four T-matrices (0/+-1 circulants with disjoint supports covering every position,
    ``sum X_i X_i^T = t I``) -> four +-1 rows whose circulants satisfy ``sum A A^T = 4t I``:
    the signed sums with the sign patterns of the rows of a Hadamard matrix of order 4."""
    x = np.stack([np.asarray(v, dtype=np.int64) for v in (x1, x2, x3, x4)])
    if np.any(np.abs(x).sum(0) != 1):
        raise ValueError("T-matrices need disjoint supports that cover every position")
    if np.any(sum(periodic_autocorrelation(v) for v in x)[1:]):
        raise ValueError("not T-matrices: the periodic autocorrelations do not sum to zero")
    pattern = np.array([[1, 1, 1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1], [-1, 1, -1, 1]])
    a, b, c, d = pattern @ x
    return a, b, c, d


def t_sequences_to_t_matrices(t1: np.ndarray, t2: np.ndarray, t3: np.ndarray, t4: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T-sequences are T-matrices: a zero nonperiodic sum at every shift makes the periodic one zero
    (P(s) = N(s) + N(t - s)). Checked here so bad data fails before any matrix is built."""
    ts = [np.asarray(v, dtype=np.int64) for v in (t1, t2, t3, t4)]
    if np.any(_nonperiodic_sum(ts, [1, 1, 1, 1])[1:]):
        raise ValueError("not T-sequences: the nonperiodic autocorrelations do not sum to zero")
    return ts[0], ts[1], ts[2], ts[3]


def circulant(row: np.ndarray) -> np.ndarray:
    """``M[i, j] = row[(j - i) mod t]``: each row is the previous one shifted right."""
    row = np.asarray(row)
    t = len(row)
    idx = (np.arange(t)[None, :] - np.arange(t)[:, None]) % t
    return row[idx]


def goethals_seidel(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Hadamard matrix of order 4t from four +-1 first rows of length t whose circulants satisfy
    ``A A^T + B B^T + C C^T + D D^T = 4t I`` (equivalently, periodic autocorrelations summing to
    zero at every nonzero shift). R is the back-identity; circulants commute and ``X R`` is
    symmetric for every circulant X, which is what makes the off-diagonal blocks of ``H H^T`` cancel."""
    rows = [np.asarray(v, dtype=np.int64) for v in (a, b, c, d)]
    t = len(rows[0])
    if any(len(r) != t for r in rows) or any(np.any(np.abs(r) != 1) for r in rows):
        raise ValueError("the Goethals-Seidel array takes four +-1 rows of one length")
    if np.any(sum(periodic_autocorrelation(r) for r in rows)[1:]):
        raise ValueError("rows unsuitable for the Goethals-Seidel array: periodic autocorrelations do not sum to zero")
    A, B, C, D = (circulant(r) for r in rows)

    def rev(m: np.ndarray) -> np.ndarray:  # m @ R
        return m[:, ::-1]

    h = np.block([
        [A, rev(B), rev(C), rev(D)],
        [-rev(B), A, -rev(D.T), rev(C.T)],
        [-rev(C), rev(D.T), A, -rev(B.T)],
        [-rev(D), -rev(C.T), rev(B.T), A],
    ])
    return h.astype(np.int8)


# The 8 x 8 sign table of Miyamoto's array: 2 x 2 diagonal blocks [[1, -1], [-1, 1]] and off the
# diagonal +-J_2 with the signs of the skew part of a skew Hadamard matrix of order 4.
_MIYAMOTO_SKEW = np.array([[0, 1, 1, 1], [-1, 0, 1, -1], [-1, -1, 0, 1], [-1, 1, -1, 0]])
_MIYAMOTO_SIGNS = (np.kron(np.eye(4, dtype=np.int64), np.array([[1, -1], [-1, 1]]))
                   + np.kron(_MIYAMOTO_SKEW, np.ones((2, 2), dtype=np.int64)))


def miyamoto(conference: np.ndarray, hadamard: np.ndarray) -> np.ndarray:
    """Hadamard matrix of order 4q (M. Miyamoto, J. Combin. Theory Ser. A 57 (1991) 86-108) from a
    symmetric conference matrix of order q + 1, normalized (``C[0, 0] = 0``, rest of row and column
    0 all +1), and any Hadamard matrix of order q - 1."""
    c = np.asarray(conference, dtype=np.int64)
    k = np.asarray(hadamard, dtype=np.int64)
    q = c.shape[0] - 1
    m = (q - 1) // 2
    if q % 4 != 1 or c.shape != (q + 1, q + 1) or k.shape != (2 * m, 2 * m):
        raise ValueError(f"Miyamoto needs a conference matrix of order q + 1 with q = 1 (mod 4) and a "
                         f"Hadamard matrix of order q - 1; got {c.shape} and {k.shape}")
    if c[0, 0] != 0 or np.any(c[0, 1:] != 1) or np.any(c[1:, 0] != 1) or not np.array_equal(c, c.T):
        raise ValueError("Miyamoto needs a normalized symmetric conference matrix")
    # Row 1 is orthogonal to row 0, so its entries in columns 2 .. 2m + 1 hold m +1's and m -1's.
    # Swapping the misplaced ones (rows and columns alike, so C stays a symmetric conference matrix)
    # makes that row +1 on its first half and -1 on its second, which the blocks below rely on.
    first = [i for i in range(2, m + 2) if c[1, i] < 0]
    second = [j for j in range(m + 2, 2 * m + 2) if c[1, j] > 0]
    perm = np.arange(q + 1)
    perm[first], perm[second] = second, first
    c = c[np.ix_(perm, perm)]
    c1, c2, c4 = -c[2:m + 2, 2:m + 2], c[2:m + 2, m + 2:], c[m + 2:, m + 2:]
    k1, k2, k3, k4 = k[:m, :m], k[:m, m:], -k[m:, :m], k[m:, m:]
    z, i = np.zeros((m, m), dtype=np.int64), np.eye(m, dtype=np.int64)
    u = [[c1, c2, z, z], [c2.T, c4, z, z], [z, z, c1, c2], [z, z, c2.T, c4]]
    v = [[i, z, k1, k2], [z, i, k3, k4], [k1.T, k3.T, i, z], [k2.T, k4.T, z, i]]
    e = np.ones((1, 2 * m), dtype=np.int64)
    blocks = []
    for r in range(8):
        row = []
        for col in range(8):
            s = _MIYAMOTO_SIGNS[r, col]
            if r % 2 == 0:
                row.append(np.full((1, 1), s) if col % 2 == 0 else s * e)
            elif col % 2 == 0:
                row.append(s * e.T)
            else:
                uu, vv = u[r // 2][col // 2], v[r // 2][col // 2]
                row.append(s * np.block([[uu + vv, uu - vv], [uu - vv, uu + vv]]))
        blocks.append(row)
    return np.block(blocks).astype(np.int8)


def _t_matrices_107() -> tuple[np.ndarray, ...]:
    base = base_sequences_from_turyn(*(signs(s) for s in hadamard_data.TURYN_36))
    return t_sequences_to_t_matrices(*t_sequences_from_base(*base))


def _t_matrices_67() -> tuple[np.ndarray, ...]:
    return tuple(signs(s) for s in hadamard_data.T_MATRICES_67)


# order t of the T-matrices -> (their first rows, where they come from)
T_MATRICES = {
    67: (_t_matrices_67, "Sawade's T-matrices of order 67"),
    107: (_t_matrices_107, "T-sequences of length 107 from Turyn-type TT(36)"),
}


def goethals_seidel_from_t_matrices(t: int) -> np.ndarray:
    """The (unnormalized) Goethals-Seidel Hadamard matrix of order 4t from the stored T-matrices."""
    return goethals_seidel(*goethals_seidel_rows_from_t_matrices(*T_MATRICES[t][0]()))


# ---- recipes --------------------------------------------------------------------------------
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
def _classic_recipe(k: int) -> tuple | None:
    """Sylvester, Paley I / II and their Kronecker products only."""
    if k in (1, 2) or (k & (k - 1)) == 0:
        return ("sylvester", k)
    if k % 4:
        return None
    direct = _paley_recipe(k)
    if direct:
        return direct
    for a in range(2, int(math.isqrt(k)) + 1):
        if k % a == 0 and (a <= 2 or a % 4 == 0) and _classic_recipe(a) and _classic_recipe(k // a):
            return ("kron", a, k // a)
    return None


@lru_cache(maxsize=None)
def _recipe(k: int) -> tuple | None:
    """How to build an order-k Hadamard matrix, or None if we cannot. Where the classic
    constructions reach k they are used, so such matrices never change as constructions are added."""
    r = _classic_recipe(k)
    if r is not None or k % 4:
        return r
    if k // 4 in T_MATRICES:
        return ("goethals-seidel", k // 4)
    for a in range(2, int(math.isqrt(k)) + 1):
        if k % a == 0 and (a <= 2 or a % 4 == 0) and _recipe(a) and _recipe(k // a):
            return ("kron", a, k // a)
    q = k // 4
    if q % 4 == 1 and prime_power(q) and _recipe(q - 1):
        return ("miyamoto", q)
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
    elif r[0] == "goethals-seidel":
        h = goethals_seidel_from_t_matrices(r[1])
    elif r[0] == "miyamoto":
        h = miyamoto(paley_conference(r[1]), _build(r[1] - 1))
    else:
        h = np.kron(_build(r[1]), _build(r[2]))
    h = _normalize(h)
    h.setflags(write=False)
    return h


def construction(n: int) -> str:
    """Human-readable recipe, e.g. ``'148 (Paley II, q=73) x 2^7'``."""
    k, p = hadamard_factor(n)
    return f"{_describe(k)} x 2^{int(math.log2(p))}"


def _field(q: int) -> str:
    p, e = prime_power(q)
    return f"q={q}" if e == 1 else f"q={p}^{e}"


def _describe(k: int) -> str:
    r = _recipe(k)
    if r[0] == "sylvester":
        return str(k)
    if r[0] == "kron":
        return f"({_describe(r[1])} x {_describe(r[2])})"
    if r[0] == "goethals-seidel":
        return f"{k} (Goethals-Seidel, {T_MATRICES[r[1]][1]})"
    if r[0] == "miyamoto":
        return f"{k} (Miyamoto, {_field(r[1])}, with {_describe(r[1] - 1)})"
    return f"{k} (Paley {'I' if r[0] == 'paley1' else 'II'}, {_field(r[1])})"


@lru_cache(maxsize=None)
def hadamard_factor(n: int) -> tuple[int, int] | None:
    """``(K, P)`` with ``n == K * P``, P a power of two, H_K constructible and K smallest;
    None when no construction exists. A factorization the classic constructions (Sylvester, Paley,
    Kronecker) reach wins over one with a smaller K from the newer ones, so the matrix of every
    width that was exact before they were added stays the same."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    for recipe in (_classic_recipe, _recipe):
        p = n & -n  # largest power of two dividing n
        while p >= 1:
            k = n // p
            if recipe(k) is not None:
                return k, p
            p //= 2
    return None


def is_constructible(n: int) -> bool:
    return hadamard_factor(n) is not None


def nearest_constructible(n: int) -> tuple[int | None, int]:
    """The largest constructible order below n (None for n <= 1) and the smallest above it."""
    below = next((m for m in range(n - 1, 0, -1) if is_constructible(m)), None)
    above = next(m for m in range(n + 1, 2 * n + 3) if is_constructible(m))  # 2^k lies in (n, 2n]
    return below, above


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
    below, above = nearest_constructible(n)
    near = f"{below} ({construction(below)}) below, " if below else ""
    return ValueError(
        f"no exact Hadamard matrix of order {n} can be built here (n = K * 2^m needs a K-block from "
        f"Sylvester, Paley I / II, the stored Goethals-Seidel data (268, 428), Miyamoto or a Kronecker "
        f"product of those); nearest constructible widths: {near}{above} ({construction(above)}) above; "
        f"choose a fallback: 'pad' (zero-pad to {pad_target(n)}) or 'orthogonal' (random orthogonal "
        f"K-block x Hadamard)"
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


ROW_BLOCK_ELEMENTS = 1 << 19  # rows transformed together: a block of about 2 MB (fp32) stays in cache


def _kronecker_transform(x2d: torch.Tensor, mats: list[torch.Tensor], epilogue=None) -> torch.Tensor:
    """``x2d @ (A (x) B (x) ...).T`` as one small GEMM per factor, a block of rows at a time.

    A row seen as a tensor of shape ``(a, b, ...)`` is multiplied by each factor along its own axis: the last
    factor as a plain GEMM on the trailing axis, every other one as a batched ``factor @ view(lead, f, tail)``,
    so no axis is ever moved (no transposed copies). Blocks of rows keep the intermediate results in cache.

    ``epilogue(block, first_row)``, if given, is applied to each block of transformed rows while it is in cache
    (e.g. quantizing it with a static scale) and its results are what is returned."""
    rows, n = x2d.shape
    sizes = [m.shape[0] for m in mats]
    step = max(1, ROW_BLOCK_ELEMENTS // n)

    def block(xs: torch.Tensor) -> torch.Tensor:
        r = xs.shape[0]
        y = xs.reshape(-1, sizes[-1]) @ mats[-1].t()
        for j in range(len(mats) - 2, -1, -1):
            lead, tail = r * math.prod(sizes[:j]), math.prod(sizes[j + 1:])
            y = torch.matmul(mats[j], y.reshape(lead, sizes[j], tail))
        return y.reshape(r, n)

    if rows <= step:
        y = block(x2d)
        return y if epilogue is None else epilogue(y, 0)
    out = None
    for i in range(0, rows, step):
        y = block(x2d[i:i + step])
        if epilogue is not None:
            y = epilogue(y, i)
        if out is None:
            out = torch.empty((rows, y.shape[1]), dtype=y.dtype, device=y.device)
        out[i:i + step] = y
    return out


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
                       fallback: str = "error", epilogue=None) -> torch.Tensor:
    """``x @ H.T`` (divided by sqrt(n) when ``normalize``) along the last dimension, for any
    supported n and any leading shape. With a ``"pad"`` plan the output is ``plan.out_dim`` wide.
    ``epilogue(rows, first_row)`` is applied to the transformed rows (``[rows, out_dim]``), block by block while
    they are in cache on the torch path, to the whole result after the CUDA kernel."""
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
        if epilogue is not None:
            y = epilogue(y.reshape(-1, plan.out_dim), 0)
    else:
        y = _kronecker_transform(x.reshape(-1, plan.out_dim), _factor_matrices(plan, x.dtype, x.device, scale),
                                 epilogue)
    return y.reshape(*lead, y.shape[-1])  # out_dim wide, or what the epilogue made of it


class OnlineHadamard(nn.Module):
    """Applies the normalized Hadamard transform to the last dimension at run time (the online
    half of a rotation whose other half was folded into the next weight). ``fp32=True`` computes
    it in float32 whatever the input dtype."""

    def __init__(self, n: int, fp32: bool = False, fallback: str = "error") -> None:
        super().__init__()
        self.n = n
        self.fp32 = fp32
        self.plan = get_plan(n, fallback)

    def forward(self, x: torch.Tensor, epilogue=None) -> torch.Tensor:
        """The transform; ``epilogue(rows, first_row)`` as in :func:`hadamard_transform`, fed the rows in ``x``'s
        dtype (after the float32 transform's cast back with ``fp32=True``)."""
        if self.fp32 and x.dtype != torch.float32:
            if epilogue is None:
                return hadamard_transform(x.float(), plan=self.plan).to(x.dtype)
            return hadamard_transform(x.float(), plan=self.plan,
                                      epilogue=lambda y, first: epilogue(y.to(x.dtype), first))
        return hadamard_transform(x, plan=self.plan, epilogue=epilogue)

    def extra_repr(self) -> str:
        return f"n={self.n}, {self.plan.kind}, K={self.plan.k}, fp32={self.fp32}"
