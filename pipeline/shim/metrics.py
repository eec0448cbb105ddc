"""Prometheus metrics for a service's shim: what its emitters sent, dropped, failed, rejected.

A custom collector: nothing is mirrored, each scrape reads ``emitter.stats()``
(one locked snapshot per emitter) and builds the families from it. Works with
:class:`pipeline.Emitter`, :class:`pipeline.AsyncEmitter` or anything else with a
``stats() -> EmitterStats`` method. This module is the only part of the shim that
imports ``prometheus_client``; ``import pipeline`` stays free of it.

::

    from prometheus_client import start_http_server
    from pipeline import Emitter
    from pipeline.shim.metrics import register

    emitter = Emitter()
    register(emitter)                 # or register(other, name="audit") for a second one
    start_http_server(8000)           # /metrics

Exposed, each labelled ``emitter`` (the name given, ``"default"`` otherwise):
``<ns>_shim_events_sent_total``, ``<ns>_shim_events_dropped_total``,
``<ns>_shim_events_failed_total``, ``<ns>_shim_events_invalid_total`` (counters)
and ``<ns>_shim_buffered_events`` (gauge: waiting or being retried now).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.shim.outbox import EmitterStats

__all__ = ["DEFAULT_NAME", "HasStats", "ShimCollector", "register"]

DEFAULT_NAME = "default"

# A metric name prefix: the Prometheus metric name grammar (as COMMPIPE_METRICS_NAMESPACE).
_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

# (field of EmitterStats, metric name after "<ns>_shim_", help)
_COUNTERS = (
    ("sent", "events_sent", "Events the shim delivered to Kafka."),
    ("dropped", "events_dropped",
     "Events the shim dropped: buffer full, emitter closed, or undelivered at close."),
    ("failed", "events_failed", "Events in records Kafka refused for good."),
    ("invalid", "events_invalid", "Events not sent because they break wire format v1."),
)
_BUFFERED = ("buffered_events", "Events in the shim's buffer now, waiting or being retried.")


class HasStats(Protocol):
    """What the collector reads: ``Emitter``, ``AsyncEmitter`` or an ``Outbox``."""

    def stats(self) -> EmitterStats: ...


def _check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(
            f"namespace must be a Prometheus metric name prefix ([a-zA-Z_:][a-zA-Z0-9_:]*), "
            f"e.g. 'commpipe'; got {namespace!r}")
    return namespace


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"emitter name must be a non-empty string; got {name!r}")
    return name


class ShimCollector(Collector):
    """Reports the counts of one or more emitters, told apart by the ``emitter`` label.

    ``emitters`` maps a name to an emitter (or is an iterable of ``(name, emitter)``
    pairs); add more later with :meth:`add`. Register it yourself with
    ``registry.register(collector)``, or let :func:`register` do it.
    """

    def __init__(self, emitters: Mapping[str, HasStats] | Iterable[tuple[str, HasStats]] = (),
                 *, namespace: str = "commpipe") -> None:
        self.namespace = _check_namespace(namespace)
        self._lock = threading.Lock()
        self._emitters: dict[str, HasStats] = {}
        pairs = emitters.items() if isinstance(emitters, Mapping) else emitters
        for name, emitter in pairs:
            self.add(emitter, name=name)

    @property
    def names(self) -> list[str]:
        """The ``emitter`` label values reported, in the order they were added."""
        with self._lock:
            return list(self._emitters)

    def add(self, emitter: HasStats, *, name: str | None = None) -> None:
        """Report ``emitter`` under ``name`` (default ``"default"``); a taken name is an error."""
        name = DEFAULT_NAME if name is None else _check_name(name)
        if not callable(getattr(emitter, "stats", None)):
            raise TypeError(f"emitter must have a stats() method returning EmitterStats; "
                            f"got {type(emitter).__name__}")
        with self._lock:
            if name in self._emitters:
                raise ValueError(
                    f"an emitter named {name!r} is already reported by the "
                    f"{self.namespace!r} shim metrics; pass another name= to tell them apart")
            self._emitters[name] = emitter

    def remove(self, name: str = DEFAULT_NAME) -> None:
        """Stop reporting the emitter called ``name`` (KeyError if there is none)."""
        with self._lock:
            del self._emitters[name]

    def _families(self) -> tuple[list[CounterMetricFamily], GaugeMetricFamily]:
        prefix = f"{self.namespace}_shim_"
        counters = [CounterMetricFamily(prefix + metric, doc, labels=["emitter"])
                    for _, metric, doc in _COUNTERS]
        gauge = GaugeMetricFamily(prefix + _BUFFERED[0], _BUFFERED[1], labels=["emitter"])
        return counters, gauge

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so registering does not read any emitter."""
        counters, gauge = self._families()
        yield from counters
        yield gauge

    def collect(self) -> Iterator[Metric]:
        """One ``stats()`` snapshot per emitter, at scrape time."""
        with self._lock:
            emitters = list(self._emitters.items())
        counters, gauge = self._families()
        for name, emitter in emitters:
            stats = emitter.stats()
            for family, (field, _, _) in zip(counters, _COUNTERS, strict=True):
                family.add_metric([name], getattr(stats, field))
            gauge.add_metric([name], stats.buffered)
        yield from counters
        yield gauge


# The collector register() put in each registry, per namespace, so that several emitters in
# one process share one set of families (two collectors with the same names would clash).
_registered: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, ShimCollector]] = (
    weakref.WeakKeyDictionary())
_registered_lock = threading.Lock()


def register(emitter: HasStats, *, registry: CollectorRegistry = REGISTRY,
             namespace: str = "commpipe", name: str | None = None) -> ShimCollector:
    """Expose ``emitter``'s counts in ``registry`` (default: the global one) and return the
    collector. Call again with another ``name=`` for each further emitter of the process;
    reusing a name raises ``ValueError``."""
    _check_namespace(namespace)
    with _registered_lock:
        by_namespace = _registered.setdefault(registry, {})
        collector = by_namespace.get(namespace)
        if collector is None:
            collector = ShimCollector(namespace=namespace)
            collector.add(emitter, name=name)
            registry.register(collector)  # ValueError if these names are taken already
            by_namespace[namespace] = collector
        else:
            collector.add(emitter, name=name)
    return collector
