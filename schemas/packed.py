"""The packed window value: one entity's statistics and quantile sketch in one window instance.

The worker writes one such value per entity per window instance (absolute, not increments);
the dashboard, ``pulse verify`` and the worker itself (restoring its open windows) decode many
of them at once. Every function here works on whole columns (numpy), never value by value: a
dashboard panel decodes and merges tens of thousands of values per refresh.

Layout (little-endian), version 1::

    offset  type         field
    0       u8           version (1)
    1       u8           nf: number of statistics (8 sensor readings, 11 application logs)
    2       u8           cw: bytes per sketch code offset (1, 2 or 4)
    3       u8           nw: bytes per sketch bucket count (1, 2 or 4)
    4       i32          base: the smallest sketch code of the value (0 when it has none)
    8       nf x f64     statistics in ``keys.Stat.PACKED_SENSOR`` (``PACKED_APPLOG``) order
    8+8nf   k x u{cw}    sketch codes minus base, strictly ascending
            k x u{nw}    sketch bucket counts (> 0)

``k = (len - 8 - 8 nf) / (cw + nw)``. Widths are the smallest that fit, per value: a device's
readings in one minute span a few dozen buckets and counts below 256, so a bucket costs two
bytes; the store's write volume (what MemoryDB bills) is dominated by these values.

A sensor value's last three statistics describe its readings as a series, in the order the
partition holds them: how many readings equal the one before them (within the value), and the
first and last reading. Earlier releases wrote sensor values without them (``nf`` 5); those
still decode, with the repeats their statistics prove (``n - 1`` when min = max, else 0) and
no first or last reading (NaN).

Bundles. A window hash holds one field per entity (its packed value), or, for the dimensions
``schemas.keys.bundled`` names, one field per apply that wrote it: ``@<offset>`` (the apply's
last offset) holding a *bundle*, the packed values of the entities that apply touched, each
absolute. An entity's value is the one in the newest bundle that holds it (fields of single
entities, from earlier releases or a replay, count as older than every bundle);
:func:`entity_values` resolves a hash so. Layout (little-endian), version 2::

    0       u8           version (2)
    1       u8           nf of its values
    2       u16          0
    4       u32          n: entities
    8       u32          bytes of the names
    12      n x u32      each value's length
            names        the entities' names, UTF-8, joined by "\n" (identifiers hold none)
            values       n packed values (version 1), end to end

Merging (the one merge rule of the store's contract): counts, sums, sums of squares, status
classes, error counts and repeats add; min takes the min and max the max; sketch buckets add by
code. Values merged in their series' order (:func:`follow`, the worker folding polls into a
window) also count the reading that repeats across the seam, and keep the first reading of the
first and the last of the last; values merged without an order (:func:`merge`: partitions,
panes, entities) have no first or last reading (NaN).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from schemas import sketch
from schemas.keys import Stat

VERSION: Final = 1
BUNDLE_VERSION: Final = 2
BUNDLE_PREFIX: Final = b"@"  # a bundle's field: "@<offset>"
_BUNDLE_HEAD: Final = struct.Struct("<BBHII")  # version, nf, 0, entities, bytes of names
HEADER_BYTES: Final = 8
COUNT: Final = Stat.PACKED.index(Stat.COUNT)
SUM: Final = Stat.PACKED.index(Stat.SUM)
SUMSQ: Final = Stat.PACKED.index(Stat.SUMSQ)
MIN: Final = Stat.PACKED.index(Stat.MIN)
MAX: Final = Stat.PACKED.index(Stat.MAX)
REPEATS: Final = Stat.PACKED_SENSOR.index(Stat.REPEATS)
FIRST: Final = Stat.PACKED_SENSOR.index(Stat.FIRST)
LAST: Final = Stat.PACKED_SENSOR.index(Stat.LAST)
NF_BASE: Final = len(Stat.PACKED)  # the statistics every value starts with
NF_SENSOR: Final = len(Stat.PACKED_SENSOR)
NF_APPLOG: Final = len(Stat.PACKED_APPLOG)
_WIDTHS: Final = (1, 2, 4)
_PADDED: Final = 64  # sketch bytes up to which encode lays a value out in a fixed-width slot
_CODE_SPAN: Final = 1 << 24  # sketch codes of finite doubles lie within +-2**18
_MAX_CODE: Final = (1 << 23) - 1

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class PackedError(ValueError):
    """A packed value that cannot be decoded (the message says why; ``index``: which one)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass(slots=True)
class Table:
    """Many window values, decoded: statistics per row and sketch buckets per row.

    ``row``/``code``/``count`` describe the sketch buckets, sorted by row and, within a row,
    by code (codes unique within a row). ``stats[:, COUNT]`` equals each row's bucket count
    total in every value the worker writes.
    """

    stats: F64  # [rows, nf]
    row: I64
    code: I64
    count: I64

    @property
    def rows(self) -> int:
        """Number of rows (values, entities or groups)."""
        return int(self.stats.shape[0])

    @property
    def nf(self) -> int:
        """Statistics per row."""
        return int(self.stats.shape[1])

    @staticmethod
    def empty(nf: int) -> Table:
        """A table with no rows."""
        z = np.zeros(0, dtype=np.int64)
        return Table(np.zeros((0, nf), dtype=np.float64), z, z.copy(), z.copy())

    def take(self, rows: npt.ArrayLike) -> Table:
        """The given rows (unique, any order), renumbered 0.. in that order."""
        idx = np.asarray(rows, dtype=np.int64)
        new_of = np.full(self.rows, -1, dtype=np.int64)
        new_of[idx] = np.arange(idx.size, dtype=np.int64)
        sel = new_of[self.row] >= 0
        row = new_of[self.row[sel]]
        order = np.argsort(row, kind="stable")
        return Table(self.stats[idx], row[order], self.code[sel][order], self.count[sel][order])

    def sketch_totals(self) -> I64:
        """Each row's total bucket count."""
        return np.bincount(self.row, weights=self.count, minlength=self.rows).astype(np.int64)


def concat(tables: Sequence[Table]) -> Table:
    """The rows of several tables, in order, as one table (they must agree on ``nf``)."""
    if not tables:
        return Table.empty(NF_SENSOR)
    if len(tables) == 1:
        return tables[0]
    shift = np.cumsum([0] + [t.rows for t in tables[:-1]])
    return Table(
        np.concatenate([t.stats for t in tables]),
        np.concatenate([t.row + int(o) for t, o in zip(tables, shift.tolist(), strict=True)]),
        np.concatenate([t.code for t in tables]),
        np.concatenate([t.count for t in tables]),
    )


def _width(x: I64) -> npt.NDArray[np.uint8]:
    return np.where(x < 1 << 8, 1, np.where(x < 1 << 16, 2, 4)).astype(np.uint8)


def header_dtype(nf: int) -> np.dtype[np.void]:
    """The leading bytes of a packed value with ``nf`` statistics: header, then statistics."""
    return np.dtype(
        [
            ("v", "u1"),
            ("nf", "u1"),
            ("cw", "u1"),
            ("nw", "u1"),
            ("base", "<i4"),
            ("stats", "<f8", (nf,)),
        ]
    )


def encode(table: Table) -> list[bytes]:
    """One packed value per row of ``table`` (buckets sorted by row, then code)."""
    rows, nf = table.rows, table.nf
    if rows == 0:
        return []
    k = np.bincount(table.row, minlength=rows).astype(np.int64)
    ends = np.cumsum(k)
    first = ends - k
    has = k > 0
    base = np.zeros(rows, dtype=np.int64)
    span = np.zeros(rows, dtype=np.int64)
    most = np.zeros(rows, dtype=np.int64)
    if table.code.size:
        base[has] = table.code[first[has]]
        span[has] = table.code[ends[has] - 1] - base[has]
        most[has] = np.maximum.reduceat(table.count, first[has])
    cw, nw = _width(span), _width(most)
    head = np.zeros(rows, dtype=header_dtype(nf))
    head["v"] = VERSION
    head["nf"] = nf
    head["cw"] = cw
    head["nw"] = nw
    head["base"] = base
    head["stats"] = table.stats
    hsize = head.dtype.itemsize
    # Every value laid out in one byte buffer, then cut: no per-value numpy call. Values whose
    # sketch fits in _PADDED bytes (most: a device's window spans a few buckets) come first,
    # one per fixed-width slot, so their headers are copied as one 2-d block; the others
    # follow end to end, their header bytes scattered one by one.
    body = k * (cw.astype(np.int64) + nw.astype(np.int64))
    length = hsize + body
    small = body <= _PADDED
    width = hsize + int(body[small].max(initial=0))
    n_small = int(small.sum())
    start: I64 = np.empty(rows, dtype=np.int64)
    start[small] = np.arange(n_small, dtype=np.int64) * width
    big_len = length[~small]
    start[~small] = n_small * width + np.cumsum(big_len) - big_len
    out = np.empty(n_small * width + int(big_len.sum()), dtype=np.uint8)
    head_bytes = head.view(np.uint8).reshape(rows, hsize)
    out[: n_small * width].reshape(n_small, width)[:, :hsize] = (
        head_bytes if n_small == rows else head_bytes[small]
    )
    if n_small < rows:
        big_at = start[~small]
        out[(big_at[:, None] + np.arange(hsize)).ravel()] = head_bytes[~small].ravel()
    if table.code.size:
        row = table.row
        pos: I64 = np.arange(row.size, dtype=np.int64) - first[row]
        cwb = cw[row].astype(np.int64)
        nwb = nw[row].astype(np.int64)
        _scatter(out, start[row] + hsize + pos * cwb, cwb, table.code - base[row])
        _scatter(out, start[row] + hsize + k[row] * cwb + pos * nwb, nwb, table.count)
    buf = out.tobytes()
    return [buf[a:b] for a, b in zip(start.tolist(), (start + length).tolist(), strict=True)]


def _scatter(out: npt.NDArray[np.uint8], addr: I64, width: I64, values: I64) -> None:
    """Write ``values`` as little-endian unsigned integers of ``width`` bytes at ``addr``."""
    for w in _WIDTHS:
        sel = np.flatnonzero(width == w)
        if not sel.size:
            continue
        at = addr[sel]
        raw = values[sel].astype(f"<u{w}")
        if w == 1:
            out[at] = raw
            continue
        # a byte plane at a time: a 1-d scatter each (a 2-d index of every byte cost twice that)
        planes = raw.view(np.uint8).reshape(-1, w)
        for j in range(w):
            out[at + j] = planes[:, j]


def decode(values: Sequence[bytes], nf: int | None = None) -> Table:
    """Decode packed values (all with ``nf`` statistics, or all alike when ``nf`` is None).

    Raises :class:`PackedError` naming the first malformed value; semantic checks (finite
    numbers, counts, min <= max) are :func:`problems`.
    """
    n = len(values)
    if n == 0:
        return Table.empty(nf or NF_SENSOR)
    lens = np.fromiter(map(len, values), dtype=np.int64, count=n)
    short = np.flatnonzero(lens < HEADER_BYTES)
    if short.size:
        i = int(short[0])
        raise PackedError(
            f"value {i} has {lens[i]} bytes, fewer than the {HEADER_BYTES}-byte header", i
        )
    buf = np.frombuffer(b"".join(values), dtype=np.uint8)
    starts = np.cumsum(lens) - lens
    head = buf[starts[:, None] + np.arange(HEADER_BYTES)]
    version, nfs = head[:, 0].astype(np.int64), head[:, 1].astype(np.int64)
    cw, nw = head[:, 2].astype(np.int64), head[:, 3].astype(np.int64)
    base = np.ascontiguousarray(head[:, 4:8]).view("<i4").ravel().astype(np.int64)
    want = int(nfs[0]) if nf is None else nf
    if want == NF_SENSOR and bool((nfs == NF_BASE).any()):
        return _with_legacy(values, nfs == NF_BASE, decode)
    body = lens - HEADER_BYTES - 8 * nfs
    pair = cw + nw
    bad = (
        (version != VERSION)
        | (nfs != want)
        | ~np.isin(cw, _WIDTHS)
        | ~np.isin(nw, _WIDTHS)
        | (body < 0)
    )
    bad |= np.where(bad, True, body % np.where(pair > 0, pair, 1) != 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PackedError(
            f"value {i} is not a version-{VERSION} packed value with {want} statistics "
            f"(version {version[i]}, nf {nfs[i]}, widths {cw[i]}/{nw[i]}, {lens[i]} bytes)",
            i,
        )
    hsize = HEADER_BYTES + 8 * want
    stats = (
        buf[starts[:, None] + HEADER_BYTES + np.arange(8 * want)]
        .view("<f8")
        .reshape(n, want)
        .astype(np.float64)
    )
    k = body // pair
    total = int(k.sum())
    row = np.repeat(np.arange(n, dtype=np.int64), k)
    cw_b = np.repeat(cw, k)
    nw_b = np.repeat(nw, k)
    rel = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
    code_addr = np.repeat(starts + hsize, k) + rel * cw_b
    count_addr = np.repeat(starts + hsize + k * cw, k) + rel * nw_b
    code = _gather(buf, code_addr, cw_b) + np.repeat(base, k)
    count = _gather(buf, count_addr, nw_b)
    return Table(stats, row, code, count)


def decode_stats(values: Sequence[bytes], nf: int) -> Table:
    """:func:`decode` of the header and statistics only: a table without sketch buckets.

    Checks every value as :func:`decode` does, but reads no bucket: for readers that need
    counts, sums, min and max of many values and the sketch of few (or none).
    """
    n = len(values)
    if n == 0:
        return Table.empty(nf)
    dtype = header_dtype(nf)
    hsize = dtype.itemsize
    lens = np.fromiter(map(len, values), dtype=np.int64, count=n)
    buf = np.frombuffer(b"".join(values), dtype=np.uint8)
    starts = np.cumsum(lens) - lens
    if nf == NF_SENSOR:
        whole = lens >= HEADER_BYTES
        legacy = np.zeros(n, dtype=np.bool_)
        legacy[whole] = buf[starts[whole] + 1] == NF_BASE
        if legacy.any():
            return _with_legacy(values, legacy, decode_stats)
    if (lens < hsize).any():
        _raise_first_error(values, nf, lens < hsize)
    # each value's first hsize bytes (one gather, no index per byte), read as a structured array
    windows = np.lib.stride_tricks.sliding_window_view(buf, hsize)
    head = np.ascontiguousarray(windows[starts]).view(dtype).ravel()
    cw, nw = head["cw"].astype(np.int64), head["nw"].astype(np.int64)
    pair = cw + nw
    bad = (head["v"] != VERSION) | (head["nf"] != nf)
    bad |= ~np.isin(cw, _WIDTHS) | ~np.isin(nw, _WIDTHS)
    bad |= np.where(bad, True, (lens - hsize) % np.where(pair > 0, pair, 1) != 0)
    if bad.any():
        _raise_first_error(values, nf, bad)
    z = np.zeros(0, dtype=np.int64)
    return Table(head["stats"].astype(np.float64), z, z.copy(), z.copy())


def _with_legacy(
    values: Sequence[bytes],
    legacy: npt.NDArray[np.bool_],
    read: Callable[[Sequence[bytes], int], Table],
) -> Table:
    """Sensor values some of which were written without the series statistics, read by
    ``read`` (:func:`decode` or :func:`decode_stats`) in their order, all with them."""
    old, new = np.flatnonzero(legacy), np.flatnonzero(~legacy)
    parts = []
    for idx, nf in ((new, NF_SENSOR), (old, NF_BASE)):
        try:
            parts.append(read([values[i] for i in idx.tolist()], nf))
        except PackedError as exc:
            i = None if exc.index is None else int(idx[exc.index])
            why = str(exc).replace(f"value {exc.index} ", f"value {i} ", 1)
            raise PackedError(why, i) from None
    s = parts[1].stats
    n = s[:, COUNT]
    proven = np.where((n > 0) & (s[:, MIN] == s[:, MAX]), np.maximum(n - 1, 0), 0.0)
    nan = np.full(n.size, np.nan)
    parts[1] = Table(np.c_[s, proven, nan, nan], parts[1].row, parts[1].code, parts[1].count)
    at = np.empty(len(values), dtype=np.int64)
    at[np.concatenate((new, old))] = np.arange(len(values), dtype=np.int64)
    return concat(parts).take(at)


def _raise_first_error(values: Sequence[bytes], nf: int, bad: npt.NDArray[np.bool_]) -> None:
    """Raise the :class:`PackedError` :func:`decode` raises for these values."""
    decode(values, nf)
    i = int(np.flatnonzero(bad)[0])
    raise PackedError(f"value {i} is not a packed value with {nf} statistics", i)


def _gather(buf: npt.NDArray[np.uint8], addr: I64, width: I64) -> I64:
    """Little-endian unsigned integers of ``width`` (1, 2 or 4) bytes at ``addr``."""
    out = buf[addr].astype(np.int64)
    two = np.flatnonzero(width >= 2)
    if two.size:
        out[two] |= buf[addr[two] + 1].astype(np.int64) << 8
        four = two[width[two] == 4]
        if four.size:
            a = addr[four]
            out[four] |= (buf[a + 2].astype(np.int64) << 16) | (buf[a + 3].astype(np.int64) << 24)
    return out


def problems(table: Table, limit: int = 5) -> list[tuple[str, list[int]]]:
    """What is wrong with decoded values: (what, first ``limit`` rows) per kind of problem."""
    out: list[tuple[str, list[int]]] = []

    def rows(mask: npt.NDArray[np.bool_]) -> list[int]:
        return [int(i) for i in np.flatnonzero(mask)[:limit]]

    s = table.stats
    sensor = table.nf == NF_SENSOR
    if table.rows:
        # a first or last reading may be unknown (NaN), never infinite
        ends = [FIRST, LAST] if sensor else []
        finite = np.asarray(
            np.isfinite(np.delete(s, ends, axis=1)).all(axis=1) & ~np.isinf(s[:, ends]).any(axis=1),
            dtype=np.bool_,
        )
        if not finite.all():
            out.append(("holds a non-finite statistic", rows(~finite)))
        counts = s[:, [COUNT, REPEATS] if sensor else [COUNT, *range(NF_BASE, table.nf)]]
        bad = ((counts < 0) | (counts != np.floor(counts))).any(axis=1) & finite
        if bad.any():
            out.append(("holds a count that is not a whole number >= 0", rows(bad)))
        inverted = (s[:, COUNT] > 0) & (s[:, MIN] > s[:, MAX])
        if inverted.any():
            out.append(("has min > max", rows(inverted)))
        if sensor:
            many = s[:, REPEATS] > np.maximum(s[:, COUNT] - 1, 0)
            if many.any():
                out.append(("repeats more readings than it holds", rows(many)))
    per_row = np.zeros(table.rows, dtype=np.bool_)
    if table.count.size:
        per_row[table.row[table.count <= 0]] = True
    if table.code.size > 1:
        same_row = table.row[1:] == table.row[:-1]
        per_row[table.row[1:][same_row & (table.code[1:] <= table.code[:-1])]] = True
    if per_row.any():
        out.append(("has an empty or out-of-order sketch bucket", rows(per_row)))
    if table.rows:
        mismatch = table.sketch_totals() != s[:, COUNT]
        if mismatch.any():
            out.append(("has a sketch total unequal to its count", rows(mismatch)))
    return out


def merge(table: Table, groups: npt.ArrayLike, n_groups: int) -> Table:
    """Rows merged by group (``groups[i]`` in ``0..n_groups-1`` is row ``i``'s group).

    A group with no rows has count 0 and min/max of +inf/-inf. The rows merge without an
    order: a sensor group's first and last reading are NaN.
    """
    g = np.asarray(groups, dtype=np.int64)
    nf = table.nf
    s = table.stats
    out = np.empty((n_groups, nf), dtype=np.float64)
    for j in range(nf):
        if nf == NF_SENSOR and j in (FIRST, LAST):
            col = np.full(n_groups, np.nan)  # no series order across the merged values
        elif j == MIN:
            col = np.full(n_groups, np.inf)
            np.minimum.at(col, g, s[:, j])
        elif j == MAX:
            col = np.full(n_groups, -np.inf)
            np.maximum.at(col, g, s[:, j])
        else:
            col = np.bincount(g, weights=s[:, j], minlength=n_groups)
        out[:, j] = col
    row, code, count = merge_buckets(g[table.row], table.code, table.count)
    return Table(out, row, code, count)


def follow(before: F64, after: F64) -> F64:
    """Statistics of values merged in their series' order: row ``i`` of ``before``, then row
    ``i`` of ``after`` (the worker folding a poll's readings into an open window)."""
    out = before + after
    out[:, MIN] = np.minimum(before[:, MIN], after[:, MIN])
    out[:, MAX] = np.maximum(before[:, MAX], after[:, MAX])
    if before.shape[1] == NF_SENSOR:
        had = before[:, COUNT] > 0
        # the seam: the first reading of ``after`` repeats the last of ``before``
        out[:, REPEATS] += had & (before[:, LAST] == after[:, FIRST])
        out[:, FIRST] = np.where(had, before[:, FIRST], after[:, FIRST])
        out[:, LAST] = np.where(after[:, COUNT] > 0, after[:, LAST], before[:, LAST])
    return out


def merge_buckets(row: I64, code: I64, count: I64) -> tuple[I64, I64, I64]:
    """Buckets added up by (row, code), sorted by row then code."""
    if row.size == 0:
        return row, code, count
    lo, hi = int(code.min()), int(code.max())
    span = hi - lo + 1
    rows = int(row.max()) + 1
    # dense enough: count in place, no sort (a dense table much larger than the input would
    # cost more to clear and scan than sorting the input)
    if rows * span <= 4 * row.size + 1024:
        dense = np.bincount(row * span + (code - lo), weights=count, minlength=rows * span)
        nz = np.flatnonzero(dense)
        return nz // span, nz % span + lo, dense[nz].astype(np.int64)
    key = row * _CODE_SPAN + (code + _CODE_SPAN // 2)
    uniq, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv.ravel(), weights=count).astype(np.int64)
    return uniq // _CODE_SPAN, uniq % _CODE_SPAN - _CODE_SPAN // 2, total


def quantiles(table: Table, qs: Sequence[float] = sketch.QUANTILES) -> F64:
    """Quantile estimates ``[rows, len(qs)]`` from each row's sketch (NaN for an empty one).

    The same estimate as :func:`schemas.sketch.quantiles` (rank ``floor(q * (n - 1))``),
    for every row at once.
    """
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q}")
    out = np.full((table.rows, len(qs)), np.nan)
    if table.code.size == 0:
        return out
    value = sketch.bucket_values(table.code)
    row, count = table.row, table.count
    # buckets come sorted by row and code, and code order is value order for values of one
    # sign above 1 (latencies, most readings): the sort is then skipped (the check is O(n))
    step = row[1:] - row[:-1]
    if not bool(np.all((step > 0) | ((step == 0) & (value[1:] > value[:-1])))):
        order = np.lexsort((value, row))
        row, value, count = row[order], value[order], count[order]
    cum = np.cumsum(count)
    totals = np.bincount(row, weights=count, minlength=table.rows).astype(np.int64)
    first = np.searchsorted(row, np.arange(table.rows))
    before = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0)
    has = np.flatnonzero(totals > 0)
    for j, q in enumerate(qs):
        rank = np.floor(q * (totals[has] - 1)).astype(np.int64)
        pos = np.searchsorted(cum, before[has] + rank + 1, side="left")
        out[has, j] = value[pos]
    return out


def from_values(stats: F64, bucket_row: I64, bucket_code: I64, bucket_count: I64) -> Table:
    """A table from unsorted, possibly repeated buckets (they are added up and sorted)."""
    row, code, count = merge_buckets(bucket_row, bucket_code, bucket_count)
    return Table(np.asarray(stats, dtype=np.float64), row, code, count)


def check_codes(code: I64) -> None:
    """Raise :class:`PackedError` for sketch codes a value cannot hold."""
    if code.size and (np.abs(code) > _MAX_CODE).any():
        raise PackedError("a sketch code is outside the packed range")


def encode_bundle(names: Sequence[str], values: Sequence[bytes], nf: int) -> bytes:
    """One bundle of entities' packed values (see the module docs)."""
    text = "\n".join(names).encode()
    lengths = np.fromiter(map(len, values), dtype="<u4", count=len(values))
    head = _BUNDLE_HEAD.pack(BUNDLE_VERSION, nf, 0, len(names), len(text))
    return b"".join((head, lengths.tobytes(), text, *values))


def decode_bundle(blob: bytes) -> tuple[list[bytes], list[bytes]]:
    """A bundle's entity names (UTF-8) and packed values, in order.

    Raises :class:`PackedError` when the bundle's own layout is wrong; its values are checked
    by whoever decodes them (:func:`decode`)."""
    size = _BUNDLE_HEAD.size
    if len(blob) < size:
        raise PackedError(f"a bundle of {len(blob)} bytes is shorter than its header")
    version, _, _, n, text = _BUNDLE_HEAD.unpack_from(blob)
    if version != BUNDLE_VERSION:
        raise PackedError(f"not a version-{BUNDLE_VERSION} bundle (version {version})")
    at = size + 4 * n + text
    if at > len(blob):
        raise PackedError(f"a bundle of {n} entities is cut short ({len(blob)} bytes)")
    lengths = np.frombuffer(blob, dtype="<u4", count=n, offset=size).astype(np.int64)
    names = blob[size + 4 * n : at].split(b"\n") if n else []
    if len(names) != n or at + int(lengths.sum()) != len(blob):
        raise PackedError(
            f"a bundle's {n} entities do not match its names ({len(names)}) or its size"
        )
    ends = (at + np.cumsum(lengths)).tolist()
    return names, [blob[a:b] for a, b in zip([at, *ends[:-1]], ends, strict=True)]


def entity_values(fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """A window hash as entity name -> packed value, its bundles resolved (module docs).

    Raises :class:`PackedError` for a bundle that does not decode or an unnumbered one."""
    if not any(f.startswith(BUNDLE_PREFIX) for f in fields):
        return dict(fields)
    out = {f: v for f, v in fields.items() if not f.startswith(BUNDLE_PREFIX)}
    bundles: list[tuple[int, bytes]] = []
    for f, v in fields.items():
        if f.startswith(BUNDLE_PREFIX):
            digits = f[len(BUNDLE_PREFIX) :]
            if not digits.isdigit():
                raise PackedError(f"bundle field {f!r} is not numbered")
            bundles.append((int(digits), v))
    for seq, blob in sorted(bundles):
        try:
            names, values = decode_bundle(blob)
        except PackedError as exc:
            raise PackedError(f"bundle @{seq}: {exc}") from None
        out.update(zip(names, values, strict=True))
    return out
