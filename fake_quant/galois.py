"""Just enough finite-field arithmetic for Paley's Hadamard constructions: the quadratic
character of GF(q), q = p^k, and differences of field elements.

An element of GF(p^k) is a polynomial of degree < k over GF(p), stored as the integer whose
base-p digits are its coefficients (so for k = 1 an element is just its residue).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q == p**k`` and p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # smallest divisor is prime
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _polymod(a: list[int], m: list[int], p: int) -> list[int]:
    """Remainder of polynomial ``a`` by monic ``m`` (coefficient lists, lowest degree first)."""
    a = a[:]
    dm = len(m) - 1
    for i in range(len(a) - 1, dm - 1, -1):
        c = a[i] % p
        if c:
            for j in range(dm + 1):
                a[i - dm + j] = (a[i - dm + j] - c * m[j]) % p
    return [c % p for c in a[:dm]] + [0] * max(0, dm - len(a))


def _polymul(a: list[int], b: list[int], p: int) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] = (out[i + j] + x * y) % p
    return out


def _monic_polys(deg: int, p: int):
    for code in range(p**deg):
        coeffs = [(code // p**i) % p for i in range(deg)]
        yield coeffs + [1]


@lru_cache(maxsize=None)
def irreducible_poly(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree ``k`` over GF(p) (lowest degree first)."""
    for m in _monic_polys(k, p):
        if all(any(_polymod(m, d, p)) for deg in range(1, k // 2 + 1) for d in _monic_polys(deg, p)):
            return tuple(m)
    raise ArithmeticError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


@lru_cache(maxsize=None)
def quadratic_character(q: int) -> np.ndarray:
    """``chi[x]`` for every element code x of GF(q): 0 for 0, +1 for nonzero squares, -1 otherwise."""
    pk = prime_power(q)
    if pk is None:
        raise ValueError(f"{q} is not a prime power")
    p, k = pk
    chi = -np.ones(q, dtype=np.int8)
    chi[0] = 0
    if k == 1:
        squares = (np.arange(1, q, dtype=np.int64) ** 2) % q
    else:
        m = list(irreducible_poly(p, k))
        squares = []
        for x in range(1, q):
            c = [(x // p**i) % p for i in range(k)]
            sq = _polymod(_polymul(c, c, p), m, p)
            squares.append(sum(v * p**i for i, v in enumerate(sq)))
        squares = np.array(squares, dtype=np.int64)
    chi[squares] = 1
    return chi


def difference_table(q: int) -> np.ndarray:
    """``D[a, b]`` = code of ``a - b`` in GF(q), for all element codes a, b."""
    p, k = prime_power(q)
    codes = np.arange(q, dtype=np.int64)
    digits = np.stack([(codes // p**i) % p for i in range(k)], axis=-1)  # [q, k]
    diff = (digits[:, None, :] - digits[None, :, :]) % p                  # [q, q, k]
    return (diff * (p ** np.arange(k))).sum(-1)
