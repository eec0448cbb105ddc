"""The aggregation core: plain Python over plain data, no Faust, no Kafka, no database.

Windows (:mod:`~pipeline.core.window`), edge and partition state
(:mod:`~pipeline.core.edge`), the store's keys and codec
(:mod:`~pipeline.core.store`), the batch that applies records exactly once
(:mod:`~pipeline.core.batch`), the latency sketch, circuit machines, producer
dedup, kept events, cumulative totals, the read side (:mod:`~pipeline.core.rollups`)
and the service-level objectives (:mod:`~pipeline.core.slo`). The worker's Faust
table only holds and replicates what these compute.
"""

from pipeline.core.batch import PartitionBatch
from pipeline.core.rollups import Rollups, WindowRow
from pipeline.core.sketch import LatencySketch
from pipeline.core.window import WindowConfig, WindowStats

__all__ = ["LatencySketch", "PartitionBatch", "Rollups", "WindowConfig", "WindowRow",
           "WindowStats"]
