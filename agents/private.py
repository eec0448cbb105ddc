"""Every private name of Faust, mode or aiokafka the worker uses, checked when it starts.

The worker reads its input a fetch at a time (:mod:`agents.intake`); Faust has no public
way to take a topic's records out of its per-record path, nor to choose how long its
consumer's fetches wait. Each name below says what breaks without it. :func:`check` runs
before the app is built: a name that is missing, or no longer callable the way the worker
calls it, stops the worker with one line naming it, instead of a wrong count later.
faust-streaming, mode-streaming and aiokafka are pinned to the minor versions these names
were read in (``pyproject.toml``); ``tests/unit/agents/test_private.py`` checks the
installed versions.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

__all__ = ["PRIVATE", "Private", "PrivateNameMissing", "check", "check_instance", "install"]


class PrivateNameMissing(ConfigError):
    """An installed Faust or aiokafka lacks a private name the worker relies on."""


@dataclass(frozen=True)
class Private:
    """One private name: where it lives, the parameters the worker passes it, and why."""

    module: str
    path: str
    """``Class.attribute`` in ``module``; an instance attribute is named ``Class().attr``."""
    why: str
    """What breaks without it."""
    parameters: tuple[str, ...] | None = None
    """The leading parameter names of a method the worker wraps (its signature is relied on)."""

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}"

    @property
    def instance(self) -> bool:
        return "()." in self.path


PRIVATE: tuple[Private, ...] = (
    Private("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread._fetch_records",
            "the input topic's records are taken out of each fetch here, in the consumer "
            "thread, with their partition's seek mark (agents/intake.py); without it they "
            "go through Faust's per-record path and the worker reads nothing",
            ("self", "consumer", "active_partitions", "timeout", "max_records")),
    Private("faust.transport.drivers.aiokafka",
            "AIOKafkaConsumerThread._create_worker_consumer",
            "the only place to reach the aiokafka consumer before it starts, to set its "
            "fetch wait (Faust fixes 1,500 ms)", ("self", "transport")),
    Private("aiokafka", "AIOKafkaConsumer()._fetch_max_wait_ms",
            "COMMPIPE_WORKER_FETCH_WAIT_MS: read by start(); no public setter"),
)


def _resolve(entry: Private) -> Any:
    module = importlib.import_module(entry.module)
    owner, _, attribute = entry.path.replace("()", "").partition(".")
    return getattr(getattr(module, owner), attribute)


def check() -> None:
    """Raise :class:`PrivateNameMissing` naming the first class-level name that is gone or
    whose parameters changed (instance attributes: :func:`check_instance`)."""
    for entry in PRIVATE:
        if entry.instance:
            continue
        try:
            found = _resolve(entry)
        except (ImportError, AttributeError):
            raise PrivateNameMissing(_missing(entry)) from None
        if entry.parameters is not None:
            names = tuple(inspect.signature(found).parameters)[:len(entry.parameters)]
            if names != entry.parameters:
                raise PrivateNameMissing(
                    f"{entry.name} takes ({', '.join(names)}), the worker passes "
                    f"({', '.join(entry.parameters)}): {entry.why}; pin the tested version "
                    "or update agents/private.py")


def check_instance(obj: Any, path: str, kind: type) -> None:
    """Raise :class:`PrivateNameMissing` unless ``obj`` has the instance attribute of the
    registry entry ``path`` holding a ``kind``."""
    entry = next(e for e in PRIVATE if e.path == path)
    if not isinstance(getattr(obj, path.rpartition(".")[2], None), kind):
        raise PrivateNameMissing(_missing(entry))


def _missing(entry: Private) -> str:
    return (f"this installation has no {entry.name}: {entry.why}; pin the tested version or "
            "update agents/private.py")


def install() -> None:
    """Wrap the two Faust methods of :data:`PRIVATE` (once per process). Each wrapper does
    what Faust does for an app that sets nothing; for an app with ``intake`` (an
    :class:`agents.intake.Intake`) the fetch goes through :meth:`Intake.fetch`, and for an
    app with ``fetch_wait_ms`` the new consumer waits that long per fetch and is handed to
    ``intake.attach`` (in the consumer thread, before it starts)."""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_commpipe_hooks", False):
        return
    fetch = cls._fetch_records
    create = cls._create_worker_consumer

    async def _fetch_records(self: Any, consumer: Any, active_partitions: Any,
                             timeout: float | None = None, max_records: int | None = None
                             ) -> Any:
        intake = getattr(self.app, "intake", None)
        if intake is None:
            return await fetch(self, consumer, active_partitions, timeout=timeout,
                               max_records=max_records)
        return await intake.fetch(fetch, self, consumer, active_partitions, timeout,
                                  max_records)

    def _create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        wait = getattr(self.app, "fetch_wait_ms", None)
        if wait is not None:
            check_instance(consumer, "AIOKafkaConsumer()._fetch_max_wait_ms", int)
            consumer._fetch_max_wait_ms = wait  # noqa: SLF001 - read by start()
        intake = getattr(self.app, "intake", None)
        if intake is not None:
            intake.attach(consumer, self.app.loop)
        return consumer

    cls._fetch_records = _fetch_records  # type: ignore[method-assign]
    cls._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]
    cls._commpipe_hooks = True  # type: ignore[attr-defined]
