"""Prometheus exposition: per-edge series (:mod:`.edges`), the worker's own (:mod:`.collectors`)
and the ``/metrics`` body built off the event loop (:mod:`.exposition`)."""

from pipeline.export.collectors import WorkerCollector
from pipeline.export.edges import EdgeExporter

__all__ = ["EdgeExporter", "WorkerCollector"]
