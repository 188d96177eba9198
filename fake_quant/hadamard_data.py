"""Published sequence data behind the Hadamard matrices that Sylvester, Paley and Kronecker products
cannot reach. Only the data lives here; ``hadamard_utils`` assembles it.

``+`` is +1, ``-`` is -1 and ``0`` is 0.
"""
from __future__ import annotations

# Turyn-type sequences TT(36) (lengths 36, 36, 36, 35) of H. Kharaghani and B. Tayfeh-Rezaie,
# "A Hadamard matrix of order 428", J. Combin. Des. 13 (2005) 435-440: their nonperiodic
# autocorrelations satisfy N_X + N_Y + 2 N_Z + 2 N_W = 0 at every shift s >= 1. They give base
# sequences of lengths 71, 71, 36, 36 and T-sequences of length 107, hence order 4 * 107 = 428.
TURYN_36 = (
    "+++----++-+-+-----++++-++-++++----+-",  # X
    "+-+++++--+-+--+--++--++++-++++---++-",  # Y
    "+-+++++-+--++++-+++-++--+++-+--+---+",  # Z
    "+++-+-----++--+-+++--+-+-+++-++++-+",   # W
)

# T-matrices of order 67 of K. Sawade, "A Hadamard matrix of order 268", Graphs Combin. 1 (1985)
# 185-187, as the first rows of four circulants: their supports partition the 67 positions and
# the sum of circ(X_i) circ(X_i)^T is 67 I. They give order 4 * 67 = 268.
T_MATRICES_67 = (
    "+000-000-000---00-000000-0-0-0+-000000+000-000000-0000000000000000+",
    "0+00000-000-000++00000+0000000000000000-++00---00000-+0-00000000++0",
    "00000-+000+0000000++-00+0-0-00000000-+00000+0000-0000000+--0+000000",
    "00--00000+00000000000+0000000+00-+-+00000000000+00+-00-0000-0-++000",
)
