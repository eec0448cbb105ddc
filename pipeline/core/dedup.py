"""Which of a producer's numbered records an edge has applied: the shim numbers its records
per edge (headers ``commpipe-producer``, ``commpipe-seq``, kept on every retry), and the
worker applies each number once (see :mod:`pipeline.core.store`, "Exactness under producer
retries")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from pipeline.settings import MAX_UNWRITTEN_RECORDS

__all__ = ["CALL_HORIZON_S", "MAX_CALLS", "MAX_DUP_OFFSETS", "MAX_GAPS", "MAX_PRODUCERS",
           "PRODUCER_HORIZON_S", "ProducerSeqs", "first_time"]

MAX_GAPS: Final = 64
"""Most missing record numbers an edge remembers per producer (a gap is a record not yet
seen, e.g. one still being retried while a later one landed; gaps are rare and short)."""
MAX_CALLS: Final = 1_000
"""Most retried calls an edge follows for the backoff objective (beyond: the older half,
and any not retried for CALL_HORIZON_S of event time, are forgotten)."""
CALL_HORIZON_S: Final = 120.0
MAX_DUP_OFFSETS: Final = MAX_UNWRITTEN_RECORDS
"""Most offsets of skipped copies an edge remembers (for replays after a crash): as many as
records of one partition can wait unwritten, all copies at worst. Offsets at or before
the partition's last written meta are forgotten at each write (a replay skips those)."""
MAX_PRODUCERS: Final = 256
"""Most producers an edge remembers: the ones seen most recently are kept."""
PRODUCER_HORIZON_S: Final = 3_600.0
"""A producer not heard from on an edge for this long (in record time: the Kafka
timestamps of its records, so that a replay forgets the same producers) is forgotten: a
copy arriving later than that would count twice."""


@dataclass(slots=True)
class ProducerSeqs:
    """Which of one producer's records of one edge have been applied: every number up to
    ``high`` except those in ``gaps``."""

    high: int = 0
    gaps: list[int] = field(default_factory=list)
    last_seen: float = 0.0

    def first_time(self, seq: int) -> bool:
        """Record ``seq`` as applied; False when it already was (a duplicate)."""
        if seq > self.high:
            self.gaps.extend(range(max(self.high + 1, seq - MAX_GAPS), seq))
            del self.gaps[:-MAX_GAPS]
            self.high = seq
            return True
        if seq in self.gaps:
            self.gaps.remove(seq)
            return True
        return False


def first_time(producers: dict[str, ProducerSeqs], producer: str, seq: int, at: float
               ) -> bool:
    """Record ``producer``'s record ``seq`` in ``producers`` (one edge's); False when it was
    applied already (``at``: the record's timestamp). Producers silent for
    :data:`PRODUCER_HORIZON_S` are forgotten, and at most :data:`MAX_PRODUCERS` are kept
    (the most recently seen)."""
    seqs = producers.get(producer)
    if seqs is None:
        for gone in [p for p, s in producers.items() if s.last_seen < at - PRODUCER_HORIZON_S]:
            del producers[gone]
        if len(producers) >= MAX_PRODUCERS:
            del producers[min(producers, key=lambda p: producers[p].last_seen)]
        seqs = producers[producer] = ProducerSeqs()
    seqs.last_seen = at
    return seqs.first_time(seq)
