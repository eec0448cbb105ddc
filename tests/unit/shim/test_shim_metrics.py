"""The shim's Prometheus collector, read through the text exposition as Prometheus would."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import AsyncEmitter, Emitter, EmitterStats
from pipeline.shim.metrics import ShimCollector, register
from pipeline.shim.outbox import Outbox
from tests.unit.shim.test_shim import closed_port, settings

METRICS = ("sent", "dropped", "failed", "invalid")


class Fixed:
    """Anything with ``stats()`` will do."""

    def __init__(self, stats: EmitterStats) -> None:
        self.value = stats

    def stats(self) -> EmitterStats:
        return self.value


def scrape(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """``{(sample name, emitter label): value}`` from the text exposition."""
    text = generate_latest(registry).decode()
    return {(s.name, s.labels["emitter"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def shim_values(registry: CollectorRegistry, emitter: str = "default",
                namespace: str = "commpipe") -> tuple[float, ...]:
    """(sent, dropped, failed, invalid, buffered) as scraped for one emitter."""
    samples = scrape(registry)
    names = [f"{namespace}_shim_events_{m}_total" for m in METRICS]
    names.append(f"{namespace}_shim_buffered_events")
    return tuple(samples[(n, emitter)] for n in names)


def test_every_field_maps_to_its_metric_with_types_and_help() -> None:
    registry = CollectorRegistry()
    register(Fixed(EmitterStats(sent=1, dropped=2, failed=3, invalid=4, buffered=5)),
             registry=registry)
    assert shim_values(registry) == (1, 2, 3, 4, 5)
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    assert {name: f.type for name, f in families.items()} == {
        "commpipe_shim_events_sent": "counter",
        "commpipe_shim_events_dropped": "counter",
        "commpipe_shim_events_failed": "counter",
        "commpipe_shim_events_invalid": "counter",
        "commpipe_shim_buffered_events": "gauge",
    }
    assert all(f.documentation for f in families.values())
    # nothing else: no _created samples, no samples without the emitter label
    assert len(scrape(registry)) == 5


def test_values_are_read_at_scrape_time() -> None:
    registry = CollectorRegistry()
    source = Fixed(EmitterStats(0, 0, 0, 0, 0))
    register(source, registry=registry)
    assert shim_values(registry) == (0, 0, 0, 0, 0)
    source.value = EmitterStats(sent=10, dropped=1, failed=0, invalid=2, buffered=7)
    assert shim_values(registry) == (10, 1, 0, 2, 7)


def test_registering_reads_no_emitter() -> None:
    class Untouchable:
        def stats(self) -> EmitterStats:
            raise AssertionError("stats() read before the first scrape")

    register(Untouchable(), registry=CollectorRegistry())


def test_emitter_with_broker_away_buffers_and_drops() -> None:
    emitter = Emitter(closed_port(), "t", settings=settings(shim_buffer_size=10))
    registry = CollectorRegistry()
    register(emitter, registry=registry)
    try:
        for _ in range(8):  # valid
            emitter.request(source_service="a", target_service="b")
        for _ in range(4):  # invalid (bad service name); 2 of the 12 find the buffer full
            emitter.request(source_service="bad name", target_service="b")
        # events are validated when sent, so with no broker the invalid ones wait too
        assert shim_values(registry) == (0, 2, 0, 0, 10)
    finally:
        emitter.close(timeout=0.1)
    # closing with the broker still away: what was buffered counts as dropped
    assert shim_values(registry) == (0, 12, 0, 0, 0)


def test_invalid_events_counted_once_the_sender_validates_them() -> None:
    box = Outbox(topic="t", capacity=100, batch_events=10, batch_bytes=10_000, linger_s=0.01,
                 producer_options={})
    registry = CollectorRegistry()
    register(box, registry=registry)
    good = {"v": 1, "kind": "request", "source_service": "a", "target_service": "b",
            "protocol": "http", "ts": 1.7e9}
    for _ in range(5):
        box.put(dict(good))
    for _ in range(3):
        box.put({**good, "source_service": "bad name"})
    assert shim_values(registry) == (0, 0, 0, 0, 8)
    records = box.encode(*box.take())  # what the sender does before sending
    assert sum(r.events for r in records) == 5
    assert shim_values(registry) == (0, 0, 0, 3, 5)


def test_async_emitter() -> None:
    registry = CollectorRegistry()

    async def main() -> tuple[float, ...]:
        emitter = AsyncEmitter(closed_port(), "t",
                               settings=settings(shim_buffer_size=5, shim_close_timeout_s=0.1))
        register(emitter, registry=registry, name="async")
        async with emitter:
            for _ in range(7):
                emitter.request(source_service="a", target_service="b")
            return shim_values(registry, "async")

    assert asyncio.run(main()) == (0, 2, 0, 0, 5)
    assert shim_values(registry, "async") == (0, 7, 0, 0, 0)


def test_two_emitters_share_the_families() -> None:
    registry = CollectorRegistry()
    first = register(Fixed(EmitterStats(1, 0, 0, 0, 3)), registry=registry)
    second = register(Fixed(EmitterStats(9, 2, 1, 0, 0)), registry=registry, name="audit")
    assert first is second and first.names == ["default", "audit"]
    assert shim_values(registry) == (1, 0, 0, 0, 3)
    assert shim_values(registry, "audit") == (9, 2, 1, 0, 0)
    text = generate_latest(registry).decode()
    assert text.count("# TYPE commpipe_shim_events_sent_total counter") == 1


def test_duplicate_name_is_refused() -> None:
    registry = CollectorRegistry()
    register(Fixed(EmitterStats(1, 0, 0, 0, 0)), registry=registry)
    with pytest.raises(ValueError, match="'default' is already reported"):
        register(Fixed(EmitterStats(2, 0, 0, 0, 0)), registry=registry)
    register(Fixed(EmitterStats(1, 0, 0, 0, 0)), registry=registry, name="x")
    with pytest.raises(ValueError, match="'x' is already reported"):
        register(Fixed(EmitterStats(2, 0, 0, 0, 0)), registry=registry, name="x")
    assert shim_values(registry) == (1, 0, 0, 0, 0)  # the first one is still the one reported
    with pytest.raises(ValueError, match="'x' is already reported"):
        ShimCollector([("x", Fixed(EmitterStats(0, 0, 0, 0, 0)))] * 2)


def test_registries_and_namespaces_are_separate() -> None:
    source = Fixed(EmitterStats(4, 0, 0, 0, 1))
    one, two = CollectorRegistry(), CollectorRegistry()
    register(source, registry=one)
    register(source, registry=two)  # same name, another registry: fine
    register(source, registry=two, namespace="svc")
    register(source, registry=two, namespace="_team:svc")
    assert shim_values(one) == shim_values(two) == (4, 0, 0, 0, 1)
    assert shim_values(two, namespace="svc") == (4, 0, 0, 0, 1)
    assert shim_values(two, namespace="_team:svc") == (4, 0, 0, 0, 1)


@pytest.mark.parametrize("namespace", ["", "1commpipe", "comm-pipe", "comm pipe", "comm.pipe", "é"])
def test_bad_namespace_is_refused(namespace: str) -> None:
    registry = CollectorRegistry()
    with pytest.raises(ValueError, match="namespace must be a Prometheus metric name prefix"):
        register(Fixed(EmitterStats(0, 0, 0, 0, 0)), registry=registry, namespace=namespace)
    with pytest.raises(ValueError, match="namespace must be"):
        ShimCollector(namespace=namespace)
    assert generate_latest(registry) == b""  # nothing was registered


def test_bad_name_or_emitter_is_refused() -> None:
    registry = CollectorRegistry()
    with pytest.raises(ValueError, match="non-empty"):
        register(Fixed(EmitterStats(0, 0, 0, 0, 0)), registry=registry, name="")
    with pytest.raises(TypeError, match="stats"):
        register(object(), registry=registry)  # type: ignore[arg-type]
    assert generate_latest(registry) == b""


def test_collector_used_directly() -> None:
    collector = ShimCollector({"a": Fixed(EmitterStats(1, 0, 0, 0, 0))}, namespace="svc")
    registry = CollectorRegistry()
    registry.register(collector)
    collector.add(Fixed(EmitterStats(2, 0, 0, 0, 0)), name="b")
    assert scrape(registry)[("svc_shim_events_sent_total", "b")] == 2
    collector.remove("a")
    assert [k for k in scrape(registry) if k[0] == "svc_shim_events_sent_total"] == [
        ("svc_shim_events_sent_total", "b")]


def test_importing_the_shim_does_not_import_prometheus_client() -> None:
    code = ("import sys; import pipeline; from pipeline import Emitter, AsyncEmitter; "
            "print('prometheus_client' in sys.modules); "
            "import pipeline.shim.metrics; print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "True"]
