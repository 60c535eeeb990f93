"""Compiled passes of the binary sketch's scan (`warm.BinarySketch`): Hamming distances of a
query's code to every row of a date window, and the second stage's pick of the rows within a
cut, each one loop over the rows instead of numpy's five array passes per word.

numpy's `bitwise_xor` / `bitwise_count` / add over 64k-row blocks ran at 1.66 ns a row for the
first stage's two words on one core; the fused loop compiled by numba (the 64-bit popcount as
a SWAR expression, which LLVM turns into the CPU's popcount) at 0.78 ns, which is the memory's
pace for 16 bytes a row (10M rows, one thread, idle machine; BENCHMARKS.md, "The sketch scan
compiled"). The second stage reads the 1-byte distances once and gathers the remaining words
only of the rows it keeps, where numpy built a mask, its positions, and then the gathers.

The functions release the GIL, so the sketch's chunk threads run them side by side. When numba
is missing (a Python it does not support yet), `AVAILABLE` is False and the sketch keeps its
numpy passes, which give the same answers (tests/indexer/search/test_hamming.py).
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this is for Pythons it lags behind
    numba = None

AVAILABLE = numba is not None

_M1, _M2, _M4, _H01 = (np.uint64(0x5555555555555555), np.uint64(0x3333333333333333),
                       np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0x0101010101010101))


def _popcount(x):
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


def _distances(w0, w1, w2, w3, count, code, start, stop, allowed, refused, out, histogram, stride):
    """out[i - start] = Hamming distance of row i to `code` over the first `count` (1-4) of the
    words w0..w3 (uint64 arrays, date order), for i in start..stop; rows whose `allowed` is 0 get
    `refused` (no mask: `allowed` empty). `histogram` counts the distances of every `stride`-th
    row, refused rows included, as numpy's bincount of the strided distances does. One loop per
    word count, so each compiles to straight-line code over the rows."""
    c0, c1, c2, c3 = code[0], code[1], code[2], code[3]
    # Slices, indexed by the loop's own counter: numba then knows the index is not negative and
    # drops its wrap-around test (with `w0[start + i]` the loop ran 3-4x slower).
    a0, a1, a2, a3 = w0[start:stop], w1[start:stop], w2[start:stop], w3[start:stop]
    n = stop - start
    if count == 1:
        for i in range(n):
            out[i] = _popcount(a0[i] ^ c0)
    elif count == 2:
        for i in range(n):
            out[i] = _popcount(a0[i] ^ c0) + _popcount(a1[i] ^ c1)
    elif count == 3:
        for i in range(n):
            out[i] = _popcount(a0[i] ^ c0) + _popcount(a1[i] ^ c1) + _popcount(a2[i] ^ c2)
    else:
        for i in range(n):
            out[i] = (_popcount(a0[i] ^ c0) + _popcount(a1[i] ^ c1)
                      + _popcount(a2[i] ^ c2) + _popcount(a3[i] ^ c3))
    if len(allowed):
        for i in range(n):
            if not allowed[i]:
                out[i] = refused
    for i in range(0, n, stride):
        histogram[out[i]] += 1


def _pick(near, cut, w0, w1, count, code, start, rows, distances):
    """The positions (start + i) of the rows whose first-stage distance `near[i]` is at most
    `cut`, into `rows`, and their distance over every word (`near` plus the first `count` (1-2)
    of w0, w1, the words the first stage did not read) into `distances`; returns how many."""
    c0, c1 = code[0], code[1]
    kept = 0
    for i in range(len(near)):
        if near[i] <= cut:
            rows[kept] = start + i
            kept += 1
    for j in range(kept):
        at = rows[j]
        d = np.uint64(near[at - start]) + _popcount(w0[at] ^ c0)
        if count == 2:
            d += _popcount(w1[at] ^ c1)
        distances[j] = d
    return kept


if AVAILABLE:
    _popcount = numba.njit(inline="always", nogil=True, cache=True)(_popcount)
    _distances = numba.njit(nogil=True, cache=True, boundscheck=False)(_distances)
    _pick = numba.njit(nogil=True, cache=True, boundscheck=False)(_pick)

_NO_MASK = np.zeros(0, dtype=np.uint8)


def _padded(words: list[np.ndarray], code: np.ndarray, size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`words` and `code` filled up to `size` (the kernels' fixed arity) with an unread array."""
    filler = words[0]
    padded = np.zeros(size, dtype=np.uint64)
    padded[:len(words)] = code[:len(words)]
    return list(words) + [filler] * (size - len(words)), padded


def distances(words: list[np.ndarray], code: np.ndarray, start: int, stop: int,
              allowed: np.ndarray | None, refused: int, dtype, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(Hamming distances of rows start..stop to `code` over `words` (1-4 uint64 arrays), as
    `dtype`; refused rows (`allowed` False) at `refused`; the histogram (int64, `refused` + 1
    bins) of every `stride`-th row's distance)."""
    if not 1 <= len(words) <= 4:
        raise ValueError(f"the compiled scan takes 1 to 4 words of 64 bits, got {len(words)}")
    out = np.empty(stop - start, dtype=dtype)
    histogram = np.zeros(refused + 1, dtype=np.int64)
    mask = _NO_MASK if allowed is None else allowed.view(np.uint8)
    padded, code = _padded(words, code, 4)
    _distances(*padded, len(words), code, start, stop, mask, refused, out, histogram, stride)
    return out, histogram


def pick(near: np.ndarray, cut: int, words: list[np.ndarray], code: np.ndarray,
         start: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions start + i of the rows with `near[i]` <= `cut`, their uint16 distances: `near`
    plus the Hamming distance over `words` (0-2 uint64 arrays) to `code`, the words the first
    stage did not read)."""
    if not words:  # a one-word sketch: the first stage read every bit
        rows = np.flatnonzero(near <= cut)
        return start + rows, near[rows].astype(np.uint16)
    if len(words) > 2:
        raise ValueError(f"the compiled second stage takes 1 or 2 words of 64 bits, got {len(words)}")
    # Room for every row; only the pages written are ever touched.
    rows, out = np.empty(len(near), dtype=np.int64), np.empty(len(near), dtype=np.uint16)
    padded, code = _padded(words, code, 2)
    kept = _pick(near, near.dtype.type(cut), *padded, len(words), code, start, rows, out)
    return rows[:kept], out[:kept]
