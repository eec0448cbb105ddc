"""Every private name the worker uses exists in the installed Faust and aiokafka, takes the
parameters the worker passes, and is gone loudly (one line naming it) when it is not."""

from __future__ import annotations

import asyncio
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from agents import private
from agents.private import PRIVATE, Private, PrivateNameMissing

ROOT = Path(__file__).resolve().parents[3]


def test_the_registry_names_three_private_names() -> None:
    assert [e.name for e in PRIVATE] == [
        "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._fetch_records",
        "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._create_worker_consumer",
        "aiokafka.AIOKafkaConsumer()._fetch_max_wait_ms",
    ]


def test_each_class_level_name_exists_with_the_parameters_the_worker_passes() -> None:
    private.check()  # raises on the first one missing


def test_the_instance_attribute_exists_on_an_unstarted_consumer() -> None:
    from aiokafka import AIOKafkaConsumer

    async def build() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:1")
        private.check_instance(consumer, "AIOKafkaConsumer()._fetch_max_wait_ms", int)

    asyncio.run(build())


def test_a_missing_name_stops_with_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = Private("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread._renamed",
                   "the worker reads nothing")
    monkeypatch.setattr(private, "PRIVATE", (*PRIVATE, gone))
    with pytest.raises(PrivateNameMissing) as caught:
        private.check()
    message = str(caught.value)
    assert "\n" not in message
    assert message == ("this installation has no faust.transport.drivers.aiokafka."
                       "AIOKafkaConsumerThread._renamed: the worker reads nothing; pin the "
                       "tested version or update agents/private.py")


def test_changed_parameters_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    moved = Private("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread._fetch_records",
                    "why", ("self", "active_partitions"))
    monkeypatch.setattr(private, "PRIVATE", (moved,))
    with pytest.raises(PrivateNameMissing, match=r"takes \(self, consumer\), the worker passes "
                                                 r"\(self, active_partitions\)"):
        private.check()


def test_an_instance_without_the_attribute_is_caught() -> None:
    class Renamed:
        fetch_wait = 1500

    with pytest.raises(PrivateNameMissing,
                       match="_fetch_max_wait_ms: COMMPIPE_WORKER_FETCH_WAIT_MS: read by"):
        private.check_instance(Renamed(), "AIOKafkaConsumer()._fetch_max_wait_ms", int)


@pytest.mark.parametrize("dist", ["faust-streaming", "mode-streaming", "aiokafka"])
def test_the_installed_versions_are_the_pinned_ones(dist: str) -> None:
    """pyproject pins the minor versions these names were read in; what is installed must
    be inside the pin (an upgrade is a decision: read the names again, then move the pin)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [*project["project"]["dependencies"],
                    *project["project"]["optional-dependencies"]["server"]]
    spec = next(r for r in requirements if re.match(rf"{dist}\b", r))
    low, high = re.fullmatch(rf"{dist}>=([\d.]+),<([\d.]+)", spec).groups()
    installed = tuple(int(x) for x in metadata.version(dist).split(".")[:3])
    assert tuple(int(x) for x in low.split(".")) <= installed < tuple(
        int(x) for x in high.split(".")), (dist, metadata.version(dist), spec)


def test_install_wraps_once() -> None:
    from faust.transport.drivers import aiokafka as driver

    private.install()
    first = driver.AIOKafkaConsumerThread._fetch_records
    private.install()
    assert driver.AIOKafkaConsumerThread._fetch_records is first
