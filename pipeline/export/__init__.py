"""Live metrics: Prometheus collectors that read the worker's state at scrape time."""

from pipeline.export.collectors import EdgeCollector, WorkerCollector

__all__ = ["EdgeCollector", "WorkerCollector"]
