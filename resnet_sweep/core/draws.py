"""Keyed random draws for many keys at once, equal to numpy's one key at a time.

The crops and flips of training image ``i`` at view ``v`` are drawn from
``np.random.default_rng([seed, i, v])`` (``crops.crop_offset``, ``crops.augment_ops``): a pure
function of the key, so that any loader, any batch order and a resumed job draw the same pixels.
One generator per crop costs about 12 us in Python; a batch of 256 crops, 3 ms. ``integers`` below
draws for a whole array of keys in a few vectorised passes: numpy's own algorithms (SeedSequence's
hash mixing, PCG64's 128-bit LCG and XSL-RR output, Lemire's bounded integers on the 32-bit halves
of its outputs), written over arrays of keys. A key whose draw needs Lemire's rare rejection step
(probability ``bound / 2**32``) is drawn again by numpy itself, so the result equals numpy's for every
key (tests/test_batches.py compares them on many keys).
"""

from __future__ import annotations

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint32
# SeedSequence (numpy/random/bit_generator.pyx)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _POOL = 0xCA01F9DD, 0x4973F715, 4
# PCG64's 128-bit multiplier (numpy/random/src/pcg64)
_MUL_HI, _MUL_LO = np.uint64(0x2360ED051FC65DA4), np.uint64(0x4385DF649FCCF645)


def _words(value: int) -> list[int]:
    """An int as SeedSequence reads it: 32-bit words, least significant first ([0] for 0)."""
    value = int(value)
    words = [0] if value == 0 else []
    while value:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
    return words


def _pool(entropy: list) -> list:
    """SeedSequence.mix_entropy on columns: ``entropy`` is a list of uint32 arrays (one per word)."""
    const = [_INIT_A]

    def hashmix(value):
        value = value ^ _U32(const[0])
        const[0] = (const[0] * _MULT_A) & 0xFFFFFFFF
        value = value * _U32(const[0])
        return value ^ (value >> _U32(16))

    def mix(x, y):
        r = _U32(_MIX_L) * x - _U32(_MIX_R) * y
        return r ^ (r >> _U32(16))

    zero = np.zeros_like(entropy[0])
    mixer = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                mixer[dst] = mix(mixer[dst], hashmix(mixer[src]))
    for src in range(_POOL, len(entropy)):
        for dst in range(_POOL):
            mixer[dst] = mix(mixer[dst], hashmix(entropy[src]))
    return mixer


def _state_words(pool: list) -> list:
    """SeedSequence.generate_state(4, np.uint64) as 8 uint32 columns."""
    const, out = _INIT_B, []
    for k in range(8):
        value = pool[k % _POOL] ^ _U32(const)
        const = (const * _MULT_B) & 0xFFFFFFFF
        value = value * _U32(const)
        out.append(value ^ (value >> _U32(16)))
    return out


def _mulhi(a, b):
    """The high 64 bits of a * b (uint64 arrays)."""
    a0, a1, b0, b1 = a & _M32, a >> np.uint64(32), b & _M32, b >> np.uint64(32)
    p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
    mid = (p00 >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    return a1 * b1 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))


def _step(hi, lo, inc_hi, inc_lo):
    """state * multiplier + inc, mod 2**128."""
    new_lo = lo * _MUL_LO
    new_hi = _mulhi(lo, _MUL_LO) + lo * _MUL_HI + hi * _MUL_LO
    out_lo = new_lo + inc_lo
    return new_hi + inc_hi + (out_lo < new_lo).astype(np.uint64), out_lo


def _outputs(keys: np.ndarray, count: int):
    """The first ``count`` 64-bit outputs of PCG64(SeedSequence(key)) for each row of ``keys``."""
    columns = []
    for j in range(keys.shape[1]):
        column = keys[:, j]
        if column.max() >= 2**32:  # a wide key: its words, the same for every row (seeds)
            if column.min() != column.max():
                raise ValueError("keys of 32 bits or more must be the same for every row")
            columns += [np.full(len(keys), w, dtype=_U32) for w in _words(int(column[0]))]
        else:
            columns.append(column.astype(_U32))
    with np.errstate(over="ignore"):
        s = [w.astype(np.uint64) for w in _state_words(_pool(columns))]
        # generate_state's uint64 words are pairs of uint32 (little-endian); PCG64 takes
        # initstate = word0 << 64 | word1 and initseq = word2 << 64 | word3
        w = [s[2 * k] | (s[2 * k + 1] << np.uint64(32)) for k in range(4)]
        inc_hi = (w[2] << np.uint64(1)) | (w[3] >> np.uint64(63))
        inc_lo = (w[3] << np.uint64(1)) | np.uint64(1)
        zero = np.zeros(len(keys), dtype=np.uint64)
        hi, lo = _step(zero, zero, inc_hi, inc_lo)
        lo2 = lo + w[1]
        hi = hi + w[0] + (lo2 < lo).astype(np.uint64)
        hi, lo = _step(hi, lo2, inc_hi, inc_lo)
        outs = []
        for _ in range(count):
            hi, lo = _step(hi, lo, inc_hi, inc_lo)
            x, rot = hi ^ lo, hi >> np.uint64(58)
            outs.append((x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63))))
    return outs


def integers(keys, bounds) -> np.ndarray:
    """``out[r, j] = np.random.default_rng(list(keys[r])).integers(bounds[r, j])`` drawn in order
    ``j = 0, 1, ...`` from one generator per row, for every row at once. ``keys``: (R, K) ints >= 0
    (a column of 2**32 or more must be the same in every row: the seed); ``bounds``: (R, J) or (J,)
    ints in 1..2**32 - 1."""
    keys = np.atleast_2d(np.asarray(keys, dtype=np.int64))
    if keys.size and keys.min() < 0:  # numpy's SeedSequence refuses them; a uint32 cast would wrap them
        raise ValueError("keys must be >= 0")
    bounds = np.broadcast_to(np.asarray(bounds, dtype=np.int64), (len(keys), np.shape(bounds)[-1]))
    rows, draws = len(keys), bounds.shape[1]
    out = np.zeros((rows, draws), dtype=np.int64)
    if rows == 0:
        return out
    # each draw takes the next 32-bit half of the outputs (low half first); a bound of 1 takes none
    taken = np.cumsum(bounds > 1, axis=1) - (bounds > 1)
    outs = _outputs(keys, (int(taken.max(initial=0)) + 2) // 2)
    halves = np.stack([h for o in outs for h in (o & _M32, o >> np.uint64(32))], axis=1)
    redo = np.zeros(rows, dtype=bool)
    for j in range(draws):
        bound = bounds[:, j].astype(np.uint64)
        m = np.take_along_axis(halves, np.minimum(taken[:, j : j + 1], halves.shape[1] - 1), axis=1)[:, 0] * bound
        out[:, j] = np.where(bound > 1, (m >> np.uint64(32)).astype(np.int64), 0)
        redo |= (bound > 1) & ((m & _M32) < bound)  # Lemire's rejection might apply: numpy decides
    for r in np.flatnonzero(redo):
        rng = np.random.default_rng([int(k) for k in keys[r]])
        out[r] = [rng.integers(int(b)) for b in bounds[r]]
    return out
