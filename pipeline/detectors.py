"""Streaming anomaly detectors: one row of numpy state per entity, vectorised over entities.

A :class:`DetectorBank` holds the state of many entities (device×metric series, services) as
rows of one float64 array. :meth:`DetectorBank.step` advances a set of *distinct* rows by one
observation each with a fixed number of numpy operations, whatever the number of rows;
:meth:`DetectorBank.score_batch` splits a poll's events into such rounds (the k-th event of each
entity) and returns per-event results in input order. A score depends only on the observation
and the ones before it of the same entity, and on nothing else (no wall clock, no randomness),
so a replay from a snapshot taken with the partition's offset yields the same scores.

Method (per entity; see docs/anomaly-detection.md):

* three predictors of the next value: the value itself, the value minus a time-of-day profile
  (48 half-hour bins), and that minus a time-of-week correction (168 hourly bins, for the
  signals stepped with context), the profiles learned outside anomaly episodes; the one with the
  lower long-run error is used once two days (two weeks) of history have been seen;
* surprises: the one-step residual against a fast level, and the short-run mean of the
  residual against a slow level (level shifts, drifts), each in units of a robust scale
  (winsorised mean absolute deviation); a run of repeated values (stuck sensor) against the
  entity's own rate of repeats and of repeats following a repeat (runs as a Markov chain); a
  value beyond the range seen so far;
* a contextual test (KNN-CAD style): the window of the last 10 values against the 48 windows
  before it (non-overlapping lags 10..57), the non-conformity being the root mean squared
  distance to the nearest in robust scales (kept as running sums, O(48) per observation);
* each surprise becomes a tail probability against its own long-run distribution (Numenta's
  "anomaly likelihood" idea), so heavy tails and autocorrelation calibrate themselves; that
  mean and variance are estimates, so the tail is a Student t's with the effective samples
  seen as degrees of freedom (a young entity needs more evidence), scaled up by how much more
  often than that t says the surprise has gone beyond a moderate level (z = 2); the
  one-step surprise counts only when two consecutive observations deviate on the same side
  (the larger of their two probabilities), so a lone outlying sample raises nothing unless it
  leaves the range seen so far; the score is ``L / (L + 5)`` with ``L = -log10(4 p)`` of the
  smallest probability ``p`` (Bonferroni over the four tests);
* an episode starts when the score reaches ``threshold`` and lasts until the score has stayed
  below ``release`` for ``refractory`` observations; within it scores are capped below the
  threshold, so one episode raises one alarm at a deterministic observation.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from schemas import anomaly

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

DAY_MS: Final = 86_400_000
BINS: Final = 48  # time-of-day profile: half-hour bins
WEEK_MS: Final = 7 * DAY_MS
WBINS: Final = 168  # time-of-week correction: hourly bins
RING: Final = anomaly.WINDOW_LEN


class _Layout:
    """Column offsets of a state row (all float64)."""

    def __init__(self) -> None:
        self.width = 0

    def col(self, size: int = 1) -> int:
        at = self.width
        self.width += size
        return at


_L = _Layout()
N = _L.col()  # observations seen
T_LAST = _L.col()  # event time of the last one (ms)
DT = _L.col()  # smoothed sampling interval (ms)
X_PREV = _L.col()
# per predictor (0: the value, 1: minus the time-of-day profile, 2: minus that and the
# time-of-week correction):
LEV = _L.col(3)  # fast level
SC = _L.col(3)  # robust scale of the one-step residual
ERR = _L.col(3)  # long-run squared one-step error
LS = _L.col(3)  # slow level
SS = _L.col(3)  # robust scale around the slow level
EWZ = _L.col()  # short-run mean of the residual against the slow level (chosen predictor)
SVAR = _L.col()  # short-run mean squared one-step z (variance ratio feature)
MU = _L.col(3)  # long-run mean of each surprise (one-step, short-run mean, kNN distance)
VAR = _L.col(3)  # long-run variance of each surprise
TAIL = _L.col(3)  # long-run rate of each surprise beyond the level of a normal z of TAIL_Z
REP = _L.col()  # long-run rate of a value repeating the previous one
RUN = _L.col()  # current run of repeats
REP2 = _L.col()  # repeats that followed a repeat, in completed runs (decayed count)
REP2_N = _L.col()  # observations that followed a repeat, in completed runs (decayed count)
LO = _L.col()  # range seen so far
HI = _L.col()
EP = _L.col()  # 1 while an episode is open
QUIET = _L.col()  # observations in a row below the release level, within an episode
Z_LAST = _L.col()  # last one-step z (signed), for the anomaly vector
SPK_LP = _L.col()  # log10 tail probability of the last observation's one-step surprise
KNN_W: Final = 10  # values per window of the contextual (kNN) test
KNN_GAP: Final = KNN_W  # reference windows end this many observations back (no overlap) ...
KNN_REF: Final = 48  # ... or up to KNN_REF - 1 more: one reference window per lag
HIST_LEN: Final = KNN_W + KNN_GAP + KNN_REF  # values kept: enough to drop the oldest pair
HIST = _L.col(HIST_LEN)  # the last HIST_LEN values, oldest first
KNN_D = _L.col(KNN_REF)  # squared distance of the newest window to the one L observations
# back, for L = KNN_GAP + KNN_REF - 1 down to KNN_GAP (running sums; one recomputed per step)
# a step reads and writes one bin of the profile: the columns before it are all a step copies
STEPPED: Final = _L.width
SEAS = _L.col(BINS)  # time-of-day profile: mean of (value - slow level) per bin
SEAS_N = _L.col(BINS)  # visits per bin
# time-of-week correction: mean of (value - slow level - time-of-day profile) per hour of the
# week, learned only by rows stepped with context (the signals whose shape over time matters)
WSEAS = _L.col(WBINS)
WSEAS_N = _L.col(WBINS)  # visits per bin
WIDTH: Final = _L.width
_SNAPSHOT_ORDER: Final = np.arange(WIDTH)
# a compact snapshot leaves out the kNN history before the values an anomaly vector shows,
# the kNN distances and the time-of-week correction: all zero in a row stepped without context
_OMITTED_HIST: Final = np.r_[HIST : HIST + HIST_LEN - RING, KNN_D : KNN_D + KNN_REF] - HIST
_OMITTED_SCAL: Final = np.array([LEV + 2, SC + 2, ERR + 2, LS + 2, SS + 2])  # the third predictor
_OMITTED: Final = np.r_[_OMITTED_SCAL, _OMITTED_HIST + HIST, WSEAS:WIDTH]
_COMPACT_ORDER: Final = _SNAPSHOT_ORDER[~np.isin(_SNAPSHOT_ORDER, _OMITTED)]
# snapshots of versions 4 (every column) and 5 (compact) have two predictors and no
# time-of-week correction, and the profile before the history: where their columns go
_V4_ORDER: Final = np.r_[
    N:LEV, LEV : LEV + 2, SC : SC + 2, ERR : ERR + 2, LS : LS + 2, SS : SS + 2, EWZ:HIST,
    SEAS : SEAS + BINS, SEAS_N : SEAS_N + BINS, HIST:STEPPED,
]  # fmt: skip
_V5_ORDER: Final = _V4_ORDER[~np.isin(_V4_ORDER, _OMITTED)]
# A row's profile (time-of-day and time-of-week) changes one bin per step, while the columns
# before it change on every step: snapshots that a caller writes often hold the stepped
# columns only (a *head*), and the profile goes in *chunks* that are written when a step has
# changed them. A snapshot every 5 minutes then writes 1.6 KB of a row, not 4.7 KB.
DAY_CHUNK: Final = 12  # time-of-day bins per chunk (6 hours)
WEEK_CHUNK: Final = 24  # time-of-week bins per chunk (a day)
DAY_CHUNKS: Final = BINS // DAY_CHUNK
CHUNKS: Final = DAY_CHUNKS + WBINS // WEEK_CHUNK  # chunks 0-3: the day; 4-10: the week
ALL_CHUNKS: Final = (1 << CHUNKS) - 1
_WEEK_BITS: Final = ALL_CHUNKS & ~((1 << DAY_CHUNKS) - 1)
# a day chunk: its bins' means and visits as float64; a week chunk: as float32 (as kept)
CHUNK_BYTES: Final = 8 * 2 * DAY_CHUNK
# per chunk, the rows of the bank's profile block (day) or time-of-week block it holds: its
# bins' means, then their visits
_DAY_ROWS: Final = np.array(
    [np.r_[c : c + DAY_CHUNK, BINS + c : BINS + c + DAY_CHUNK] for c in range(0, BINS, DAY_CHUNK)]
)
_WEEK_ROWS: Final = np.array(
    [
        np.r_[w : w + WEEK_CHUNK, WBINS + w : WBINS + w + WEEK_CHUNK]
        for w in range(0, WBINS, WEEK_CHUNK)
    ]
)
_HEAD_ORDER: Final = np.arange(STEPPED)
_HEAD_COMPACT_ORDER: Final = _HEAD_ORDER[~np.isin(_HEAD_ORDER, _OMITTED)]
_OMITTED_STEPPED: Final = _OMITTED[_OMITTED < STEPPED]


@dataclass(frozen=True, slots=True)
class DetectorParams:
    """Tuning of the detectors; counts are in observations of the entity."""

    threshold: float = 0.5  # default alarm level of the score
    release: float = 0.225  # an episode ends after `refractory` observations below this
    refractory: int = 60
    cap: float = 0.25  # scores within an open episode are capped here (below threshold)
    warmup: int = 100  # no scores before this many observations
    fast: float = 0.5  # weight of the newest value in the fast level
    slow: float = 0.02  # ... in the slow level
    scale_rate: float = 0.01  # long-run weight of the robust scales
    long_rate: float = 0.001  # long-run weight of the surprise distributions
    short: float = 0.1  # weight of the newest residual in the short-run mean
    winsor: float = 4.0  # residuals are clipped at this many scales before updating levels
    scale_winsor: float = 2.5  # ... and at this many before updating scales
    seasonal_days: float = 2.0  # the time-of-day predictor is used after this much history
    seasonal_rate: float = 0.1  # weight of the newest visit of a time-of-day bin
    range_margin: float = 0.05  # beyond the seen range by this share of it = anomaly
    range_scales: float = 2.0  # ... and by this many robust scales
    range_log10p: float = 10.0  # ... as surprising as a tail probability of 10^-this
    half_score: float = 5.0  # the score is 0.5 at a tail probability of 10^-this
    knn_k: int = 1  # the contextual non-conformity: mean distance to the k nearest windows
    repeat_prior: float = 2.0  # pseudo-observations of the plain repeat rate in a run's rate


DEFAULT_PARAMS: Final = DetectorParams()

_STATS_FROM: Final = 10  # surprises enter their long-run distributions from this observation
_KNN_FROM: Final = 50  # the kNN test counts once its distribution has this many samples
_LOG10E: Final = math.log10(math.e)
# observations per independent sample of each surprise (one-step, short-run mean, kNN
# distance): the short-run mean with weight w is an AR(1) of lag-1 correlation 1 - w, worth
# one sample in (2 - w) / w; consecutive kNN windows share all but one of KNN_W values
_IND_KNN: Final = float(KNN_W)
# each surprise's tail is checked where it can be seen: its rate beyond the tail probability
# of a normal z of 2 (one in 44), shrunk towards that by one expected exceedance's samples
TAIL_Z: Final = 2.0
_TAIL_LP: Final = math.log10(0.5 * math.erfc(TAIL_Z / math.sqrt(2.0)))
_TAIL_Q: Final = 10.0**_TAIL_LP
_SQRT1_2: Final = math.sqrt(0.5)


def _independent(short: float) -> FloatArray:
    """Observations per independent sample of each surprise, as a column."""
    return np.array([[1.0], [(2.0 - short) / short], [_IND_KNN]])


def predictive_z(zu: FloatArray, nu: FloatArray) -> FloatArray:
    """The standard normal quantile of a value ``zu`` standardised by a mean and variance
    estimated from ``nu`` samples: its predictive Student t, ``t = zu·sqrt(ν/(ν+1))`` with ``ν``
    degrees of freedom, through Wallace's (1959) ``z = (8ν + 1)/(8ν + 3)·sqrt(ν·ln(1 + t²/ν))``
    (sign kept; ``t²/ν = zu²/(ν+1)``)."""
    z = np.sqrt(nu * np.log(1.0 + zu * zu / (nu + 1.0)))
    z *= (8.0 * nu + 1.0) / (8.0 * nu + 3.0)
    out: FloatArray = np.copysign(z, zu)
    return out


def log10_tail(z: FloatArray) -> FloatArray:
    """log10 of the standard normal upper tail Q(z), accurate deep into the tail.

    Uses the Chebyshev fit of erfc from Numerical Recipes (relative error < 1.2e-7).
    """
    x = np.abs(z) * _SQRT1_2
    t = 1.0 / (1.0 + 0.5 * x)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))  # fmt: skip
    ln_erfc = np.log(t) - x * x + poly
    upper = (ln_erfc + math.log(0.5)) * _LOG10E  # Q(|z|)
    # 1 - Q(|z|) (np.log and a factor: np.log10 costs three times as much)
    lower = np.log(np.maximum(1.0 - 0.5 * np.exp(ln_erfc), 1e-300)) * _LOG10E
    out: FloatArray = np.where(z >= 0, upper, lower)
    return out


class StepResult(NamedTuple):
    """Per observation: anomaly score in [0, 1], whether an anomaly episode starts there, what
    raised the score (an index into ``schemas.anomaly.CAUSES``: the test with the smallest tail
    probability) and the value the detector expected (its prediction before the observation)."""

    score: FloatArray
    alarm: BoolArray
    cause: IntArray
    expected: FloatArray


class BatchResult(NamedTuple):
    """Per event (input order): score and alarm; and the anomaly vector of each alarm."""

    score: FloatArray
    alarm: BoolArray
    alarm_index: IntArray  # event positions of the alarms, ascending
    vectors: npt.NDArray[np.float32]  # (len(alarm_index), VECTOR_DIM)


class SnapshotError(ValueError):
    """Bytes that are not a detector state snapshot; the message says why."""


_MAGIC: Final = b"PDS"
_VERSION: Final = 6  # every column of the row
_COMPACT: Final = 7  # the row but the columns _OMITTED, which are zero
_HEADER: Final = struct.Struct("<3sBHH")  # magic, version, columns that follow, ring length
_HEAD: Final = 8  # the stepped columns (the profile is in chunks)
_HEAD_COMPACT: Final = 9  # the stepped columns but those _OMITTED, which are zero
_ORDERS: Final = {
    _VERSION: _SNAPSHOT_ORDER,
    _COMPACT: _COMPACT_ORDER,
    _HEAD: _HEAD_ORDER,
    _HEAD_COMPACT: _HEAD_COMPACT_ORDER,
    4: _V4_ORDER,
    5: _V5_ORDER,
}
_LEGACY: Final = frozenset({4, 5})  # two predictors: the third starts as the second
SNAPSHOT_BYTES: Final = _HEADER.size + 8 * WIDTH
COMPACT_BYTES: Final = _HEADER.size + 8 * len(_COMPACT_ORDER)
HEAD_BYTES: Final = _HEADER.size + 8 * len(_HEAD_ORDER)
HEAD_COMPACT_BYTES: Final = _HEADER.size + 8 * len(_HEAD_COMPACT_ORDER)


def fresh_rows(count: int) -> FloatArray:
    """State of ``count`` entities that have seen nothing."""
    return np.zeros((count, WIDTH))


class DetectorBank:
    """The detector state of many entities, a row each.

    A row's columns are kept in three blocks, each laid out for how a step reads it: the
    scalar statistics column-major (a step works on one column of all its rows at a time,
    twice as fast contiguous as strided), the kNN history and distances row-major (a step
    works on whole rows of them) and the time-of-day profile column-major (a step reads one
    bin of each row); the time-of-week correction is kept like the profile, but only for the
    rows that have one. :attr:`state` and :meth:`rows` show them as rows of ``WIDTH`` columns.

    A caller whose rows come in groups (an entity's signals: rows ``g·k .. g·k + g - 1``) that
    step separately says so with ``group``: the bank then keeps each member of the groups in
    a plane of its own (row ``r`` at ``(r % group)·plane + r // group``), so that the rows a
    step takes (one signal of many entities) lie together, not ``group`` apart.
    """

    __slots__ = (
        "_dirty", "_group", "_hist", "_plane", "_scal", "_seas", "_size", "_week", "_wslot",
        "_wused", "params",
    )  # fmt: skip

    def __init__(
        self, capacity: int = 0, params: DetectorParams = DEFAULT_PARAMS, group: int = 1
    ) -> None:
        self.params = params
        self._group = max(1, group)
        self._plane = 0  # room per plane: the blocks hold group × plane rows
        self._size = 0  # rows in use; the blocks have room for more (zero until used)
        self._scal: FloatArray = np.zeros((HIST, 0))  # columns [0, HIST)
        self._hist: FloatArray = np.zeros((0, STEPPED - HIST))  # [HIST, STEPPED)
        self._seas: FloatArray = np.zeros((WSEAS - STEPPED, 0))  # [STEPPED, WSEAS)
        # [WSEAS, WIDTH), column-major, only for the rows that have one (those stepped with
        # context): at the scale of the worker a third of a sensor's rows, and 1.3 KB each
        # (float32: the correction needs no more, and a step rounds it the same way in a
        # straight run and after a restore, whose snapshot holds the float32 values exactly)
        self._week: npt.NDArray[np.float32] = np.zeros((WIDTH - WSEAS, 0), dtype=np.float32)
        self._wslot: IntArray = np.zeros(0, dtype=np.int64)  # per row: its column, or -1
        self._wused = 0  # columns of _week given to rows
        # per row (as kept): the profile chunks changed since take_dirty last read them
        self._dirty: IntArray = np.zeros(0, dtype=np.int64)
        self.add(capacity)

    def __len__(self) -> int:
        return self._size

    @property
    def state(self) -> FloatArray:
        """Every row's state, ``(len(self), WIDTH)`` (a copy)."""
        return self.rows(np.arange(len(self)))

    def _index(self, rows: Sequence[int] | IntArray) -> IntArray:
        """Where ``rows`` are kept in the blocks, every one of them a row in use: the blocks
        have room past :meth:`__len__` (zeros a wrong index would read silently), and numpy
        would take a negative index from the end."""
        idx = np.asarray(rows, dtype=np.int64).ravel()
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self._size):
            bad = idx[(idx < 0) | (idx >= self._size)]
            raise IndexError(f"rows {bad[:5].tolist()} are not in a bank of {self._size} rows")
        if self._group == 1:
            return idx
        at: IntArray = idx % self._group * self._plane + idx // self._group
        return at

    def rows(self, rows: Sequence[int] | IntArray) -> FloatArray:
        """The states of ``rows``, ``(len(rows), WIDTH)`` (a copy)."""
        idx = self._index(rows)
        out = np.empty((idx.size, WIDTH))
        out[:, :HIST] = self._scal[:, idx].T
        out[:, HIST:STEPPED] = self._hist[idx]
        out[:, STEPPED:WSEAS] = self._seas[:, idx].T
        slot = self._wslot[idx]
        has = slot >= 0
        out[~has, WSEAS:] = 0.0
        out[has, WSEAS:] = self._week[:, slot[has]].T
        return out

    def set_rows(self, rows: Sequence[int] | IntArray, states: FloatArray) -> None:
        """Overwrite the states of ``rows`` with ``states`` (``(len(rows), WIDTH)``)."""
        idx = self._index(rows)
        block = np.asarray(states, dtype=np.float64).reshape(idx.size, WIDTH)
        self._scal[:, idx] = block[:, :HIST].T
        self._hist[idx] = block[:, HIST:STEPPED]
        self._seas[:, idx] = block[:, STEPPED:WSEAS].T
        self._dirty[idx] = ALL_CHUNKS
        week = block[:, WSEAS:]
        given: BoolArray = np.asarray(week.any(axis=1), dtype=bool)
        slot = self._slots(idx, where=given)
        has = slot >= 0
        self._week[:, slot[has]] = week[has].T

    def _slots(self, idx: IntArray, where: BoolArray | None = None) -> IntArray:
        """The time-of-week columns of rows ``idx``, giving one to each row ``where`` (all by
        default) that has none; -1 for the others."""
        out: IntArray = self._wslot[idx]
        need = out < 0
        if where is not None:
            need &= where
        if need.any():  # (a step's rows have their columns after their first step)
            new = np.unique(idx[need])
            first = self._wused
            self._wused += new.size
            if self._wused > self._week.shape[1]:
                week = np.zeros((WIDTH - WSEAS, max(2 * self._wused, 64)), dtype=np.float32)
                week[:, :first] = self._week[:, :first]
                self._week = week
            self._wslot[new] = np.arange(first, first + new.size)
            out = self._wslot[idx]
        return out

    def add(self, count: int) -> IntArray:
        """Append ``count`` fresh rows; returns their indices."""
        first = self._size
        self._size = first + count
        g, old = self._group, self._plane
        if self._size > g * old:
            # room for twice the rows: the copy of what is held is paid every other doubling
            # of the caller's, and room not yet used is zero pages the system has not mapped
            plane = max(-(-2 * self._size // g), 64)
            room = g * plane
            scal, hist = np.zeros((HIST, room)), np.zeros((room, STEPPED - HIST))
            seas = np.zeros((WSEAS - STEPPED, room))
            wslot = np.full(room, -1, dtype=np.int64)
            dirty = np.zeros(room, dtype=np.int64)
            for j in range(g):  # each plane's rows to the start of its new place
                src, dst = slice(j * old, (j + 1) * old), slice(j * plane, j * plane + old)
                scal[:, dst] = self._scal[:, src]
                hist[dst] = self._hist[src]
                seas[:, dst] = self._seas[:, src]
                wslot[dst] = self._wslot[src]
                dirty[dst] = self._dirty[src]
            self._scal, self._hist, self._seas, self._wslot = scal, hist, seas, wslot
            self._dirty = dirty
            self._plane = plane
        return np.arange(first, self._size, dtype=np.int64)

    def clear(self, rows: IntArray) -> None:
        """Forget what ``rows`` have seen."""
        idx = self._index(rows)
        self._scal[:, idx] = 0.0
        self._hist[idx] = 0.0
        self._seas[:, idx] = 0.0
        self._clear_week(idx)
        self._dirty[idx] = ALL_CHUNKS

    def _clear_week(self, idx: IntArray) -> None:
        slot = self._wslot[idx]
        self._week[:, slot[slot >= 0]] = 0.0

    def drop_context(self, rows: Sequence[int] | IntArray) -> None:
        """Zero what only a step with context reads (the history before the values an anomaly
        vector shows, the kNN distances and the time-of-week correction), for rows stepped
        without context from now on: their snapshots are then compact."""
        idx = self._index(rows)
        self._scal[_OMITTED_SCAL[:, None], idx] = 0.0
        self._hist[idx[:, None], _OMITTED_HIST] = 0.0
        self._clear_week(idx)
        self._dirty[idx] |= _WEEK_BITS

    # --- scoring -------------------------------------------------------------------------

    def step(
        self, rows: IntArray, t_ms: IntArray, values: FloatArray, context: bool = True
    ) -> StepResult:
        """Advance distinct ``rows`` by one observation each (event time ``t_ms``, ``values``).

        Without ``context`` the rows are stepped without the contextual (kNN) test, at about
        half the cost: they keep only the recent values the anomaly vector shows. A row should
        be stepped one way throughout (a row stepped without it has no history to compare).
        """
        at = self._index(rows)
        # in the order they are kept: the state's gathers and scatters then read forwards
        order = np.argsort(at)
        t, x = np.asarray(t_ms)[order], np.asarray(values)[order]
        with np.errstate(all="ignore"):
            res = self._step(at[order], t, x, context)
        back = np.empty_like(order)
        back[order] = np.arange(order.size)
        return StepResult(res.score[back], res.alarm[back], res.cause[back], res.expected[back])

    def _step(
        self, rows: IntArray, t_ms: IntArray, values: FloatArray, context: bool
    ) -> StepResult:
        p = self.params  # (rows: where the rows are kept, see _index)
        x = np.asarray(values, dtype=np.float64)
        t = np.asarray(t_ms, dtype=np.int64)
        # the scalar columns of the rows, (HIST, m): one contiguous array per column
        st = np.take(self._scal, rows, axis=1)
        m = len(rows)
        ar = np.arange(m)
        n0 = st[N].copy()
        seen = n0 > 0
        finite = np.isfinite(x)
        x = np.where(finite, x, st[X_PREV])  # a non-finite reading is held at the last one

        # sampling interval
        dt = (t - st[T_LAST]).astype(np.float64)
        first_dt = n0 == 1
        st[DT] = np.where(
            first_dt, dt, np.where(seen, st[DT] + 0.05 * (np.maximum(dt, 0.0) - st[DT]), 0.0)
        )

        # predictors: the value, the value minus its time-of-day profile and, for a row stepped
        # with context, that minus the time-of-week correction (without context the third
        # predictor's columns stay zero)
        b = ((t % DAY_MS) * BINS // DAY_MS).astype(np.int64)
        seas = self._seas[SEAS - STEPPED + b, rows]
        span_ok = (n0 * st[DT] >= p.seasonal_days * DAY_MS) & (st[DT] < DAY_MS / BINS * 2)
        preds = [x, x - seas]
        if context:
            bw = ((t % WEEK_MS) * WBINS // WEEK_MS).astype(np.int64)
            wslot = self._slots(rows)
            wseas = self._week[bw, wslot]
            span_w = (n0 * st[DT] >= p.seasonal_days * WEEK_MS) & (st[DT] < WEEK_MS / WBINS * 2)
            preds.append(preds[1] - wseas)
        npr = len(preds)
        v = np.stack(preds)  # (npr, m)
        lev, sc, ls, ss = (st[c : c + npr] for c in (LEV, SC, LS, SS))
        v = np.where(seen, v, x)
        lev0 = np.where(seen, lev, v)
        ls0 = np.where(seen, ls, v)
        floor = 1e-9 + 1e-9 * np.abs(v)
        sig = np.maximum(sc * 1.2533, floor)
        sig_s = np.maximum(ss * 1.2533, floor)
        r = v - lev0
        rs = v - ls0
        z = r / sig
        zs = rs / sig_s
        err = st[ERR : ERR + npr]
        use_seas = span_ok & (err[1] < err[0])
        k = use_seas.astype(np.int64)
        if context:
            k = np.where(span_w & (err[2] < err[k, ar]), 2, k)
        zk, zsk = z[k, ar], zs[k, ar]

        # repeats of the same value (a stuck reading carries no information on the scale)
        rep = seen & (x == st[X_PREV])
        run = np.where(rep, st[RUN] + 1.0, 0.0)
        w_long = np.maximum(1.0 / (n0 + 1.0), p.long_rate)
        rep_rate = np.where(seen, st[REP] + w_long * (rep - st[REP]), 0.5)

        # surprises and their tail probabilities against their own long-run distributions
        ewz = st[EWZ] + p.short * (np.clip(zsk, -1e3, 1e3) - st[EWZ])
        if context:
            # contextual test (KNN-CAD style): the window of the last KNN_W values against the
            # windows of the history (running sums: the pair entering minus the pair leaving);
            # the non-conformity is the root mean squared distance to the nearest, in slow scales
            hb = self._hist[rows]  # (m, HIST_LEN + KNN_REF): the history, the kNN distances
            hb[:, : HIST_LEN - 1] = hb[:, 1:HIST_LEN]
            hb[:, HIST_LEN - 1] = x
            hist = hb[:, :HIST_LEN]
            h0, h1 = HIST_LEN - KNN_GAP - KNN_REF, HIST_LEN - KNN_W - KNN_GAP - KNN_REF
            d2 = np.subtract(x[:, None], hist[:, h0 : h0 + KNN_REF])
            np.square(d2, out=d2)
            gone = np.subtract(hist[:, HIST_LEN - 1 - KNN_W, None], hist[:, h1 : h1 + KNN_REF])
            np.square(gone, out=gone)
            d2 -= gone
            d2 += hb[:, HIST_LEN:]
            # one lag a step is recomputed from the values, so rounding residue (say, of a huge
            # value that has left the windows) lasts at most KNN_REF observations
            c = (n0 % KNN_REF).astype(np.int64)
            at = (ar * hb.shape[1] + h1 + 1 + c)[:, None] + np.arange(KNN_W)
            exact = np.square(hb.reshape(-1)[at] - hist[:, HIST_LEN - KNN_W :])
            d2[ar, c] = exact.sum(axis=1)
            np.maximum(d2, 0.0, out=d2)
            kk = min(max(p.knn_k, 1), KNN_REF)
            near = np.partition(d2, kk - 1, axis=1)[:, :kk].mean(axis=1) if kk > 1 else d2.min(1)
            nc = np.sqrt(near / KNN_W) / sig_s[0]
        else:  # only the recent values the anomaly vector shows
            ring = self._hist[rows, HIST_LEN - RING : HIST_LEN]
            ring[:, :-1] = ring[:, 1:]
            ring[:, -1] = x
        # the surprises: one-step, short-run mean and (with context) kNN distance; without
        # context the kNN surprise neither counts nor learns, and is left out
        ns = 3 if context else 2
        parts = [np.minimum(np.abs(zk), 1e3), np.abs(ewz)]
        if context:
            parts.append(np.minimum(nc, 1e3))
        u = np.stack(parts)
        u = np.where(np.isfinite(u), u, 1e3)
        mu, var = st[MU : MU + ns], st[VAR : VAR + ns]
        # samples each surprise's long-run distribution has seen (the kNN one: full history)
        cnt = np.stack([n0 - _STATS_FROM, n0 - _STATS_FROM, n0 + 1.0 - HIST_LEN][:ns])
        zu = (u - mu) / np.sqrt(np.maximum(var, 1e-12))
        # the long-run mean and variance are estimates from the effective samples seen so
        # far (at most the memory of their weights, 2 / long_rate): the surprise is judged
        # against the predictive Student t of that many degrees of freedom, not a Gaussian,
        # so a young entity (or a strongly autocorrelated surprise) needs more evidence
        ind = _independent(p.short)[:ns]
        nu = np.maximum(np.minimum(cnt, 2.0 / p.long_rate) / ind, 1.0)
        lp_t = log10_tail(predictive_z(zu, nu))
        # a heavier tail than the t's shows in the rate beyond a moderate level (TAIL_Z):
        # the deeper tail probabilities are scaled up by the same factor (never down)
        ne = np.clip(cnt, 0.0, 2.0 / p.long_rate)
        tail = st[TAIL : TAIL + ns]
        excess = (ne * tail / _TAIL_Q + 1.0 / _TAIL_Q) / (ne + 1.0 / _TAIL_Q)
        lp_u = np.minimum(lp_t + np.log(np.maximum(excess, 1.0)) * _LOG10E, 0.0)
        # a one-step surprise counts once the next observation confirms it on the same side:
        # a lone outlying sample (a glitch, a burst of one count) is left to the range test
        same_side = seen & (zk * st[Z_LAST] > 0)
        lp_spike = np.where(same_side, np.maximum(lp_u[0], st[SPK_LP]), 0.0)
        # (lp_u and lp_spike are <= 0: without context the kNN test takes no part)
        lp_knn = np.where(cnt[2] >= _KNN_FROM, lp_u[2], 0.0) if context else lp_u[1]
        lp = np.minimum(np.minimum(lp_spike, lp_u[1]), lp_knn)
        # repeats cluster (a count series sits at 0 for a while): a run is a Markov chain,
        # its first repeat at the entity's repeat rate and each further one at its rate of a
        # repeat following a repeat in the runs seen so far (shrunk towards the plain rate by
        # `repeat_prior`); the current run is learned when it ends, so it cannot explain itself
        p1 = np.clip(st[REP], 1e-6, 1.0)
        c2, n2 = st[REP2], st[REP2_N]
        p2 = np.clip((c2 + p.repeat_prior * p1) / (n2 + p.repeat_prior), 1e-6, 1.0)
        lp_stuck = np.where(run >= 2, (np.log(p1) + (run - 1.0) * np.log(p2)) * _LOG10E, 0.0)
        lp = np.minimum(lp, lp_stuck) + math.log10(4.0)
        tol = np.maximum(p.range_margin * (st[HI] - st[LO]), p.range_scales * sig_s[k, ar])
        outside = (x > st[HI] + tol) | (x < st[LO] - tol)
        outside &= tol > 0
        lp = np.where(outside, np.minimum(lp, -p.range_log10p), lp)
        # which test raised it (CAUSES order: spike, shift, stuck, range)
        # (a contextual anomaly is a change of the recent pattern: reported as a shift)
        cause = np.argmin(np.stack([lp_spike, np.minimum(lp_u[1], lp_knn), lp_stuck]), 0)
        cause = np.where(outside & (lp <= -p.range_log10p), 3, cause)
        expected = lev0[k, ar] + np.where(k > 0, seas, 0.0)
        if context:
            expected += np.where(k == 2, wseas, 0.0)
        surprise = np.maximum(-lp, 0.0)
        raw = surprise / (surprise + p.half_score)
        raw = np.where((n0 >= p.warmup) & finite, raw, 0.0)

        # episodes: one alarm each, then scores capped until quiet for `refractory` observations
        open_ = st[EP] > 0
        alarm = ~open_ & (raw >= p.threshold)
        quiet = np.where(raw < p.release, st[QUIET] + 1.0, 0.0)
        still = open_ & (quiet < p.refractory)
        st[EP] = (alarm | still).astype(np.float64)
        st[QUIET] = np.where(alarm, 0.0, quiet)
        score = np.where(open_, np.minimum(raw, p.cap), raw)

        # updates
        wsc = np.maximum(1.0 / (n0 + 1.0), p.scale_rate)
        lim = p.winsor * sig
        rc = np.clip(r, -lim, lim)
        st[LEV : LEV + npr] = np.where(seen, lev0 + p.fast * rc, v)
        upd = seen & ~rep & finite
        first_sc = n0 == 1
        # the scales learn only from unremarkable observations, and each by at most a few
        # percent: otherwise a drift inflates the scale it is measured by, and hides itself
        upd &= raw < p.threshold
        cap_sc = p.scale_winsor * sig
        new_sc = np.where(first_sc, np.abs(r), sc + wsc * (np.minimum(np.abs(r), cap_sc) - sc))
        st[SC : SC + npr] = np.where(upd, new_sc, sc)
        lim_s = p.winsor * sig_s
        rsc = np.clip(rs, -lim_s, lim_s)
        w_slow = np.maximum(1.0 / (n0 + 1.0), p.slow)
        st[LS : LS + npr] = np.where(seen, ls0 + w_slow * rsc, v)
        cap_ss = p.scale_winsor * sig_s
        new_ss = np.where(first_sc, np.abs(rs), ss + wsc * (np.minimum(np.abs(rs), cap_ss) - ss))
        st[SS : SS + npr] = np.where(upd, new_ss, ss)
        e2 = np.minimum(r * r, (p.winsor * sig) ** 2)
        st[ERR : ERR + npr] = np.where(seen & finite, err + wsc * (e2 - err), err)
        st[EWZ] = np.where(seen, ewz, 0.0)
        st[SVAR] = np.where(seen, st[SVAR] + p.short * (np.minimum(zk * zk, 1e6) - st[SVAR]), 1.0)
        ok = (cnt >= 0) & finite
        d = u - mu
        wl = np.maximum(1.0 / (np.maximum(cnt, 0.0) + 1.0), p.long_rate)
        st[MU : MU + ns] = np.where(ok, mu + wl * d, mu)
        st[VAR : VAR + ns] = np.where(ok, (1.0 - wl) * (var + wl * d * d), var)
        st[TAIL : TAIL + ns] = np.where(ok, tail + wl * ((lp_t < _TAIL_LP) - tail), tail)
        st[REP] = rep_rate
        # a run of r repeats that ends: r - 1 repeats after a repeat, in r observations after
        # one; the counts keep a memory of about 2 / long_rate observations
        ended = seen & finite & ~rep & (st[RUN] >= 1)
        c2 = np.where(ended, c2 + st[RUN] - 1.0, c2)
        n2 = np.where(ended, n2 + st[RUN], n2)
        keep = np.minimum(1.0, 2.0 / p.long_rate / np.maximum(n2, 1.0))
        st[REP2] = c2 * keep
        st[REP2_N] = n2 * keep
        st[RUN] = run
        st[LO] = np.where(seen, np.minimum(st[LO], x), x)
        st[HI] = np.where(seen, np.maximum(st[HI], x), x)
        st[Z_LAST] = np.where(seen, np.clip(zk, -1e3, 1e3), 0.0)
        st[SPK_LP] = np.where((n0 >= _STATS_FROM) & finite, np.maximum(lp_u[0], -1e3), 0.0)
        # time-of-day profile of the value around the slow level of the raw predictor; it
        # learns only outside anomaly episodes (an anomalous day would otherwise raise false
        # alarms at the same time of the following days)
        sn = self._seas[SEAS_N - STEPPED + b, rows]
        ws = np.maximum(1.0 / (sn + 1.0), p.seasonal_rate)
        dev = x - st[LS]
        learn = finite & (st[EP] == 0)
        seas_new = np.where(learn, seas + ws * (dev - seas), seas)
        if context:  # what the time-of-day profile leaves, per hour of the week
            wn = self._week[WSEAS_N - WSEAS + bw, wslot]
            ww = np.maximum(1.0 / (wn + 1.0), p.seasonal_rate)
            wseas_new = np.where(learn, wseas + ww * (dev - seas_new - wseas), wseas).astype(
                np.float32
            )  # what is kept: a value beyond float32's range is caught below
            hb[:, HIST_LEN:] = d2
        st[X_PREV] = x
        st[T_LAST] = t
        st[N] = n0 + 1.0
        # values near the float64 limit can overflow the statistics: such an entity starts over
        # (deterministically), so that every state stays finite and its snapshot decodable
        broken = ~np.isfinite(st).all(axis=0) | ~np.isfinite(seas_new)
        if context:
            # (the history holds readings, finite by the hold above: its new distances may not be)
            broken |= ~np.isfinite(d2).all(axis=1) | ~np.isfinite(wseas_new)
        st[:, broken] = 0.0
        self._scal[:, rows] = st
        if context:
            hb[broken] = 0.0
            self._hist[rows] = hb
        else:
            self._hist[rows, HIST_LEN - RING : HIST_LEN] = ring
        self._seas[SEAS - STEPPED + b, rows] = np.where(broken, 0.0, seas_new)
        self._seas[SEAS_N - STEPPED + b, rows] = np.where(broken, 0.0, sn + learn)
        changed = np.left_shift(1, b // DAY_CHUNK)
        if context:
            self._week[bw, wslot] = np.where(broken, 0.0, wseas_new)
            self._week[WSEAS_N - WSEAS + bw, wslot] = np.where(broken, 0.0, wn + learn)
            changed |= np.left_shift(1, DAY_CHUNKS + bw // WEEK_CHUNK)
        self._dirty[rows] |= changed  # (rows are distinct)
        if broken.any():
            self._seas[:, rows[broken]] = 0.0
            self._clear_week(rows[broken])
            self._dirty[rows[broken]] = ALL_CHUNKS
            if not context:
                self._hist[rows[broken]] = 0.0
        score = np.where(np.isfinite(score), score, 0.0)
        alarm &= ~broken
        return StepResult(score, alarm, np.where(alarm, cause, -1), expected)

    def score_batch(
        self, rows: IntArray, t_ms: IntArray, values: FloatArray, context: bool = True
    ) -> BatchResult:
        """Score a poll's events: ``rows[i]`` is event i's entity row; per entity, events must
        be in time order. Runs one :meth:`step` per round (the k-th event of each entity)."""
        rows = np.asarray(rows, dtype=np.int64)
        t_ms = np.asarray(t_ms, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        n = len(rows)
        score = np.zeros(n)
        alarm = np.zeros(n, dtype=bool)
        vec_at: list[IntArray] = []
        vecs: list[npt.NDArray[np.float32]] = []
        if n:
            by_row = np.argsort(rows, kind="stable")
            sr = rows[by_row]
            start = np.r_[True, sr[1:] != sr[:-1]]
            first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
            rank = np.empty(n, dtype=np.int64)
            rank[by_row] = np.arange(n) - first
            st = t_ms[by_row]
            if bool(np.any((st[1:] < st[:-1]) & ~start[1:])):
                raise ValueError("events of an entity must be in time order")
            order = np.lexsort((rows, rank))
            bounds = np.r_[0, np.cumsum(np.bincount(rank))]
            for k in range(len(bounds) - 1):
                idx = order[bounds[k] : bounds[k + 1]]
                res = self.step(rows[idx], t_ms[idx], values[idx], context)
                score[idx] = res.score
                alarm[idx] = res.alarm
                if res.alarm.any():
                    hit = idx[res.alarm]
                    vec_at.append(hit)
                    vecs.append(self.anomaly_vector(rows[hit], res.score[res.alarm]))
        if vec_at:
            at = np.concatenate(vec_at)
            o = np.argsort(at)
            return BatchResult(score, alarm, at[o], np.concatenate(vecs)[o])
        return BatchResult(
            score, alarm, np.zeros(0, np.int64), np.zeros((0, anomaly.VECTOR_DIM), np.float32)
        )

    # --- anomaly vector ------------------------------------------------------------------

    def anomaly_vector(self, rows: IntArray, scores: FloatArray) -> npt.NDArray[np.float32]:
        """(len(rows), VECTOR_DIM) float32 vectors of the rows' current state (layout in
        ``schemas.anomaly``); ``scores`` are the scores of their last observations."""
        st = self.rows(rows)
        m = len(st)
        c = anomaly.CLIP
        out = np.zeros((m, anomaly.VECTOR_DIM))
        n = st[:, N]
        ring = st[:, HIST + HIST_LEN - RING : HIST + HIST_LEN]  # oldest first
        sig = np.maximum(st[:, SS] * 1.2533, 1e-9 + 1e-9 * np.abs(st[:, LS]))
        zw = np.clip((ring - st[:, LS, None]) / sig[:, None], -c, c) / c
        have = np.arange(RING)[None, :] >= (RING - np.minimum(n, RING))[:, None]
        out[:, :RING] = np.where(have, zw, 0.0)
        out[:, anomaly.F_SCORE] = scores
        hour = 2 * np.pi * (st[:, T_LAST] % DAY_MS) / DAY_MS
        out[:, anomaly.F_HOUR_SIN] = np.sin(hour)
        out[:, anomaly.F_HOUR_COS] = np.cos(hour)
        out[:, anomaly.F_LEVEL_SHIFT] = np.clip((st[:, LEV] - st[:, LS]) / sig, -c, c) / c
        out[:, anomaly.F_VARIANCE_RATIO] = (
            np.clip(np.log(np.maximum(st[:, SVAR], 1e-12)), -c, c) / c
        )
        out[:, anomaly.F_SURPRISE] = np.clip(st[:, Z_LAST], -c, c) / c
        out[:, anomaly.F_STUCK] = np.minimum(np.log1p(st[:, RUN]) / math.log1p(64.0), 1.0)
        out[:, anomaly.F_INTERVAL] = np.clip(
            np.log10(np.maximum(st[:, DT], 1.0) / 1000.0) / 6.0, -1, 1
        )
        return out.astype(np.float32)

    # --- snapshots -----------------------------------------------------------------------

    def snapshot(self, rows: Sequence[int] | IntArray) -> list[bytes]:
        """Each row's state as bytes: a versioned header and the row's columns as
        little-endian float64. A row whose kNN history, distances and time-of-week correction
        are zero (one stepped without context) is written compact, without them: 1.2 KB, not
        4.7 KB."""
        return _snapshots(self.rows(rows), _OMITTED, _VERSION, _COMPACT)

    def restore(self, rows: Sequence[int] | IntArray, blobs: Sequence[bytes]) -> None:
        """Load snapshots into ``rows``; raises :class:`SnapshotError` (nothing loaded) if any
        blob is not a valid snapshot."""
        if len(rows) != len(blobs):
            raise ValueError("rows and blobs differ in length")
        decoded = np.stack([decode(b) for b in blobs]) if blobs else fresh_rows(0)
        self.set_rows(rows, decoded)

    def snapshot_heads(self, rows: Sequence[int] | IntArray) -> list[bytes]:
        """Each row's stepped columns as a snapshot without the profile (its chunks, from
        :meth:`chunks`, complete it): 1.2 KB, or 0.5 KB compact (a row stepped without
        context)."""
        idx = self._index(rows)
        heads = np.empty((idx.size, STEPPED))
        heads[:, :HIST] = self._scal[:, idx].T
        heads[:, HIST:] = self._hist[idx]
        return _snapshots(heads, _OMITTED_STEPPED, _HEAD, _HEAD_COMPACT)

    def take_dirty(self, rows: Sequence[int] | IntArray) -> IntArray:
        """Per row, the profile chunks (bit ``c``: chunk ``c``) changed since this was last
        called for it, or since it was loaded or cleared (every chunk); they count as clean
        from now on."""
        idx = self._index(rows)
        out = self._dirty[idx].copy()
        self._dirty[idx] = 0
        return out

    def mark_dirty(self, rows: Sequence[int] | IntArray, chunks: IntArray) -> None:
        """Count the chunks (bit masks, per row) as changed."""
        idx = self._index(rows)
        np.bitwise_or.at(self._dirty, idx, np.asarray(chunks, dtype=np.int64))

    def chunks(
        self, rows: Sequence[int] | IntArray, which: IntArray
    ) -> tuple[list[bytes], BoolArray]:
        """Profile chunk ``which[i]`` of row ``rows[i]``, as bytes (``CHUNK_BYTES``
        each), and whether it is all zero (a row that never visited its bins)."""
        idx = self._index(rows)
        which = np.asarray(which, dtype=np.int64)
        if which.size and (int(which.min()) < 0 or int(which.max()) >= CHUNKS):
            raise IndexError(f"profile chunks are 0-{CHUNKS - 1}")
        out = np.empty((idx.size, CHUNK_BYTES), dtype=np.uint8)
        day = np.flatnonzero(which < DAY_CHUNKS)
        if day.size:
            means = self._seas[_DAY_ROWS[which[day]] + (SEAS - STEPPED), idx[day, None]]
            out[day] = np.ascontiguousarray(means, dtype="<f8").view(np.uint8)
        week = np.flatnonzero(which >= DAY_CHUNKS)
        if week.size:
            slot = self._wslot[idx[week]]
            has = slot >= 0
            values = np.zeros((week.size, 2 * WEEK_CHUNK), dtype=np.float32)
            values[has] = self._week[_WEEK_ROWS[which[week[has]] - DAY_CHUNKS], slot[has, None]]
            out[week] = np.ascontiguousarray(values, dtype="<f4").view(np.uint8)
        zero: BoolArray = np.logical_not(out.any(axis=1))
        return rows_bytes(out), zero

    def restore_chunks(
        self, rows: Sequence[int] | IntArray, which: IntArray, blobs: Sequence[bytes]
    ) -> BoolArray:
        """Load profile chunks (``which[i]`` of row ``rows[i]``, distinct pairs) over rows
        restored from heads; whether each was valid (an invalid one is not loaded). They
        count as clean."""
        idx = self._index(rows)
        which = np.asarray(which, dtype=np.int64)
        if not idx.size:
            return np.zeros(0, dtype=bool)
        sized = (isinstance(b, bytes | bytearray) and len(b) == CHUNK_BYTES for b in blobs)
        ok: BoolArray = np.fromiter(sized, dtype=bool, count=idx.size)
        ok &= (which >= 0) & (which < CHUNKS)
        raw = np.zeros((idx.size, CHUNK_BYTES), dtype=np.uint8)
        if ok.any():
            raw[ok] = np.frombuffer(
                b"".join(bytes(b) for b, good in zip(blobs, ok.tolist(), strict=True) if good),
                dtype=np.uint8,
            ).reshape(-1, CHUNK_BYTES)
        day = ok & (which < DAY_CHUNKS)
        week = ok & (which >= DAY_CHUNKS)
        d_vals = raw[day].view("<f8").astype(np.float64)
        w_vals = raw[week].view("<f4").astype(np.float32)
        ok[day] = _valid_chunks(d_vals, DAY_CHUNK)
        ok[week] = _valid_chunks(w_vals.astype(np.float64), WEEK_CHUNK)
        at = np.flatnonzero(day & ok)
        if at.size:
            self._seas[_DAY_ROWS[which[at]] + (SEAS - STEPPED), idx[at, None]] = d_vals[ok[day]]
        at = np.flatnonzero(week & ok)
        if at.size:
            slot = self._slots(idx[at])
            self._week[_WEEK_ROWS[which[at] - DAY_CHUNKS], slot[:, None]] = w_vals[ok[week]]
        return ok


def _valid_chunks(values: FloatArray, bins: int) -> BoolArray:
    """Whether each chunk's means are finite and its visits whole numbers >= 0."""
    visits = values[:, bins:]
    good: BoolArray = (
        np.isfinite(values).all(axis=1)
        & (visits >= 0).all(axis=1)
        & (visits == np.floor(visits)).all(axis=1)
    )
    return good


def holds_profile(blob: bytes) -> bool:
    """Whether a valid snapshot holds its row's profile (a head does not: its chunks do)."""
    return len(blob) < _HEADER.size or blob[3] not in (_HEAD, _HEAD_COMPACT)


def _snapshots(states: FloatArray, omitted: IntArray, version: int, compact: int) -> list[bytes]:
    """Each row of ``states`` as a snapshot: of version ``compact`` where its ``omitted``
    columns are all zero, else of ``version``."""
    small = ~states[:, omitted].any(axis=1)
    out: list[bytes] = [b""] * len(states)
    for v, which in ((version, ~small), (compact, small)):
        at = np.flatnonzero(which)
        if at.size:
            for i, blob in zip(at.tolist(), rows_bytes(_pack(states[at], v)), strict=True):
                out[i] = blob
    return out


def _pack(states: FloatArray, version: int) -> npt.NDArray[np.uint8]:
    """Snapshots of state rows in one ``version`` as a 2-d array of bytes."""
    order = _ORDERS[version]
    out = np.empty((len(states), _HEADER.size + 8 * len(order)), dtype=np.uint8)
    out[:, : _HEADER.size] = np.frombuffer(
        _HEADER.pack(_MAGIC, version, len(order), RING), np.uint8
    )
    out[:, _HEADER.size :] = np.ascontiguousarray(states[:, order], dtype="<f8").view(np.uint8)
    return out


def rows_bytes(block: npt.NDArray[np.uint8]) -> list[bytes]:
    """Each row of a 2-d byte array as one ``bytes`` (a view as fixed-size raw records keeps
    trailing zero bytes, which a ``S`` string view would drop)."""
    flat = np.ascontiguousarray(block)
    width = flat.shape[1] if flat.ndim == 2 else 0
    if not width:
        return [b""] * len(flat)
    out: list[bytes] = flat.view(f"V{width}").ravel().tolist()
    return out


def decode(blob: bytes) -> FloatArray:
    """One snapshot's state row; :class:`SnapshotError` says what is wrong with bad bytes."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise SnapshotError(f"snapshot must be bytes, got {type(blob).__name__}")
    data = bytes(blob)
    if len(data) < _HEADER.size:
        raise SnapshotError(f"snapshot too short: {len(data)} bytes")
    magic, version, width, ring = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise SnapshotError("not a detector snapshot (bad magic)")
    order = _ORDERS.get(version)
    if order is None:
        raise SnapshotError(
            f"unsupported snapshot version {version} (this code reads {sorted(_ORDERS)})"
        )
    if width != len(order) or ring != RING:
        raise SnapshotError(
            f"snapshot layout {width}x{ring} differs from this code's {len(order)}x{RING}"
        )
    size = _HEADER.size + 8 * len(order)
    if len(data) != size:
        raise SnapshotError(f"snapshot is {len(data)} bytes, expected {size}")
    row = np.zeros(WIDTH)
    row[order] = np.frombuffer(data, dtype="<f8", offset=_HEADER.size)
    if version in _LEGACY:  # without the correction, the third predictor is the second
        for col in (LEV, SC, ERR, LS, SS):
            row[col + 2] = row[col + 1]
    if not bool(np.all(np.isfinite(row))):
        raise SnapshotError("snapshot holds a non-finite number")
    with np.errstate(over="ignore"):
        week32 = row[WSEAS:].astype(np.float32)
    if not np.array_equal(week32, row[WSEAS:]):  # the bank keeps them as float32
        raise SnapshotError("snapshot holds a time-of-week value that is not a float32")
    counts = row[[N, RUN, QUIET, *range(SEAS_N, SEAS_N + BINS), *range(WSEAS_N, WSEAS_N + WBINS)]]
    if bool(np.any(counts < 0)) or bool(np.any(counts != np.floor(counts))):
        raise SnapshotError("snapshot holds a negative or fractional count")
    if row[EP] not in (0.0, 1.0):
        raise SnapshotError("snapshot holds an invalid episode flag")
    scales = [DT, *range(SC, SC + 3), *range(SS, SS + 3), *range(VAR, VAR + 3)]
    if bool(np.any(row[scales] < 0)) or bool(np.any(row[KNN_D : KNN_D + KNN_REF] < 0)):
        raise SnapshotError("snapshot holds a negative scale or distance")
    if not -1e3 <= row[SPK_LP] <= 0.0:
        raise SnapshotError("snapshot holds a log10 probability outside [-1000, 0]")
    rates = row[[REP, *range(TAIL, TAIL + 3)]]
    if bool(np.any((rates < 0.0) | (rates > 1.0))):
        raise SnapshotError("snapshot holds a rate outside [0, 1]")
    if not 0.0 <= row[REP2] <= row[REP2_N]:
        raise SnapshotError("snapshot holds repeat counts that are negative or inconsistent")
    return row
