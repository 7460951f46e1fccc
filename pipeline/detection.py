"""Anomaly detection in the worker: detectors stepped on closed window instances.

Each kind watches one dimension (sensor: ``device|metric``; applog: the service) in one window
(10 s by default). When a partition's watermark closes an instance, every entity in it steps
its detectors once per signal (``schemas.anomaly.SIGNALS``) with the instance's final
statistics: the mean, maximum and minimum reading; a service's median latency and error rate.
Detector state is partition state checkpointed with the offset: the rows a poll stepped are
written (snapshots) in the same atomic apply as its offset and its anomalies, and restored from
the store with the partition's windows. A window closes at a fixed point of the partition's
record sequence (when its watermark passes the window's end), so a crash, a rebalance or a
replay steps the same detectors with the same values, and raises the same anomalies under the
same ids, once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pipeline.detectors import DEFAULT_PARAMS, DetectorBank, DetectorParams, SnapshotError
from schemas import anomaly, keys, packed
from schemas.events import EventKind

log = logging.getLogger("pulse.detection")

# the dimension each kind's detectors watch
DETECT_DIMS: dict[EventKind, str] = {
    EventKind.SENSOR: keys.Dim.DEVICE,
    EventKind.APPLOG: keys.Dim.SERVICE,
}
_FIELD_SEP = "~"  # detector state field: "<entity>~<signal>" (identifiers cannot hold it)
_ERRORS_AT = keys.Stat.PACKED_APPLOG.index(keys.Stat.ERRORS)


@dataclass(slots=True)
class Detected:
    """What a partition's closed windows raised: the detector states to write and anomalies."""

    fields: list[str] = field(default_factory=list)
    states: list[bytes] = field(default_factory=list)
    anomalies: list[anomaly.AnomalyRecord] = field(default_factory=list)


def signal_values(kind: EventKind, table: packed.Table) -> dict[str, npt.NDArray[np.float64]]:
    """Each signal's value per row of a window table (NaN where the row has no events)."""
    st = table.stats
    n = st[:, packed.COUNT]
    with np.errstate(all="ignore"):
        if kind is EventKind.SENSOR:
            return {
                anomaly.Signal.MEAN: np.where(n > 0, st[:, packed.SUM] / n, np.nan),
                anomaly.Signal.MAX: np.where(n > 0, st[:, packed.MAX], np.nan),
                anomaly.Signal.MIN: np.where(n > 0, st[:, packed.MIN], np.nan),
            }
        return {
            anomaly.Signal.LATENCY: packed.quantiles(table, (0.5,))[:, 0],
            anomaly.Signal.ERROR_RATE: np.where(n > 0, st[:, _ERRORS_AT] / n, np.nan),
        }


class KindDetectors:
    """The detectors of one event kind's partitions: a row of one bank per (partition, entity,
    signal)."""

    def __init__(
        self, kind: EventKind, window: keys.TumblingWindow, params: DetectorParams = DEFAULT_PARAMS
    ) -> None:
        self.kind = kind
        self.window = window
        self.dim = DETECT_DIMS[kind]
        self.bank = DetectorBank(0, params)
        self._rows: dict[int, dict[str, int]] = {}  # partition -> field -> row
        self._free: list[int] = []
        self.refused = 0  # stored states that could not be decoded (started afresh)

    def restored(self, partition: int) -> bool:
        """Whether the partition's detectors are loaded."""
        return partition in self._rows

    def restore(self, partition: int, stored: Mapping[bytes, bytes]) -> None:
        """Load a partition's stored detector states (``field -> snapshot``), replacing any.

        A state that does not decode (another version, damaged) is logged and started afresh:
        one entity's history is lost, never the worker.
        """
        self.drop(partition)
        mine: dict[str, int] = {}
        self._rows[partition] = mine
        if not stored:
            return
        names = [f.decode("utf-8", "replace") for f in stored]
        rows = self._alloc(len(names))
        for name, row, blob in zip(names, rows.tolist(), stored.values(), strict=True):
            mine[name] = row
            try:
                self.bank.restore([row], [blob])
            except SnapshotError as exc:  # the row stays fresh
                self.refused += 1
                log.warning("detector state %s of partition %d refused: %s", name, partition, exc)

    def drop(self, partition: int) -> None:
        """Forget a partition's detectors (restored from the store when next needed)."""
        rows = list(self._rows.pop(partition, {}).values())
        if rows:
            idx = np.asarray(rows, dtype=np.int64)
            self.bank.clear(idx)
            self._free.extend(rows)

    def clear(self) -> None:
        """Forget every partition."""
        for p in list(self._rows):
            self.drop(p)

    def detect(
        self, partition: int, closing: Sequence[tuple[int, list[str], packed.Table]]
    ) -> Detected:
        """Step the detectors of the closed instances (oldest first): the states to write and
        the anomalies raised."""
        out = Detected()
        if not closing:
            return out
        mine = self._rows.setdefault(partition, {})
        stepped: dict[str, int] = {}
        for start, names, table in closing:
            for signal, values in signal_values(self.kind, table).items():
                ok = np.isfinite(values)
                if not ok.any():
                    continue
                at = np.flatnonzero(ok)
                fields = [f"{names[i]}{_FIELD_SEP}{signal}" for i in at.tolist()]
                rows = self._rows_for(mine, fields)
                t = np.full(len(rows), start, dtype=np.int64)
                res = self.bank.step(rows, t, values[at])
                stepped.update(zip(fields, rows.tolist(), strict=True))
                if res.alarm.any():
                    hit = np.flatnonzero(res.alarm)
                    vectors = self.bank.anomaly_vector(rows[hit], res.score[hit])
                    for j, h in enumerate(hit.tolist()):
                        i = int(at[h])
                        out.anomalies.append(
                            self._record(
                                partition,
                                start,
                                names[i],
                                signal,
                                int(res.cause[h]),
                                float(res.score[h]),
                                float(values[i]),
                                float(res.expected[h]),
                                int(table.stats[i, packed.COUNT]),
                                vectors[j],
                            )
                        )
        out.fields = list(stepped)
        out.states = self.bank.snapshot(np.fromiter(stepped.values(), np.int64, len(stepped)))
        return out

    def _rows_for(self, mine: dict[str, int], fields: list[str]) -> npt.NDArray[np.int64]:
        new = [f for f in fields if f not in mine]
        if new:
            for f, r in zip(new, self._alloc(len(new)).tolist(), strict=True):
                mine[f] = r
        return np.fromiter((mine[f] for f in fields), np.int64, len(fields))

    def _alloc(self, count: int) -> npt.NDArray[np.int64]:
        reuse = [self._free.pop() for _ in range(min(count, len(self._free)))]
        fresh = self.bank.add(count - len(reuse)) if count > len(reuse) else np.zeros(0, np.int64)
        return np.concatenate([np.asarray(reuse, dtype=np.int64), fresh])

    def _record(
        self,
        partition: int,
        start: int,
        entity: str,
        signal: str,
        cause: int,
        score: float,
        value: float,
        expected: float,
        n: int,
        vector: npt.NDArray[np.float32],
    ) -> anomaly.AnomalyRecord:
        context: dict[str, str | int | float] = {"n": n}
        if self.kind is EventKind.SENSOR:
            device, _, metric = entity.partition(keys.ENTITY_SEP)
            context.update(device=device, metric=metric)
        else:
            context["service"] = entity
        return anomaly.AnomalyRecord(
            id=anomaly.anomaly_id(self.kind.value, partition, start, entity, signal),
            kind=self.kind.value,
            partition=partition,
            entity=entity,
            signal=signal,
            cause=anomaly.CAUSES[cause] if 0 <= cause < len(anomaly.CAUSES) else "range",
            window_start_ms=start,
            window_ms=self.window.size_ms,
            score=round(score, 6),
            value=value,
            expected=expected if np.isfinite(expected) else value,
            context=context,
            vector=vector,
        )
