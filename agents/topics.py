"""Create Kafka topics explicitly, with a fixed partition count.

Relying on auto-creation gives whatever the broker's default is (4 on Tansu,
1 on a stock Kafka), and Faust tables need their changelogs to match the
source topic's partition count. :func:`ensure_topics` is idempotent: a topic
that already exists with the wanted count is left alone; one with another
count raises :class:`~pipeline.errors.ConfigError` naming both counts.

Partition counts of existing topics are read only after ``CreateTopics``
answered "already exists": a metadata request for an unknown topic makes some
brokers (Tansu among them) auto-create it with their default count.

:func:`ensure_commpipe_topics` creates every topic the worker uses, each with explicit
configs rather than the broker's defaults: the input (``cleanup.policy=delete``,
``retention.ms`` = ``COMMPIPE_TOPIC_RETENTION_MS``), the dead letters (the same with
``COMMPIPE_DLQ_RETENTION_MS``), the worker's changelog (``cleanup.policy=compact``: the
latest value of every key is the table; never deleted by age) and Faust's leader topic,
all with ``COMMPIPE_TOPIC_REPLICATION_FACTOR`` replicas and, when set,
``COMMPIPE_TOPIC_MIN_INSYNC_REPLICAS``. Faust would create the last two itself, with one
replica; created here first, it finds them and leaves them alone. The OTLP topic
(``COMMPIPE_OTLP_TOPIC``, when set) is created like the input when missing and left as it
is, whatever its partition count, when it exists. Configs of topics that already exist
are not changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import ConfigError, ServiceError
from pipeline.settings import Settings

__all__ = ["changelog_topic", "commpipe_topics", "ensure_commpipe_topics", "ensure_topics",
           "leader_topic", "otlp_topics"]

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


async def ensure_topics(
    topics: Mapping[str, int],
    *,
    client_options: Mapping[str, Any],
    replication_factor: int = 1,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    timeout_ms: int = 10_000,
    any_count: frozenset[str] = frozenset(),
) -> dict[str, bool]:
    """Make sure each ``name -> partitions`` topic exists with exactly that many partitions
    (a topic named in ``any_count``: created with that many when missing, left as it is
    when it exists).

    ``client_options`` are aiokafka client keyword arguments, at least
    ``bootstrap_servers`` (see :meth:`Settings.kafka_client_options`).
    ``replication_factor`` applies to topics created here (default 1, fine for
    one dev broker); ``configs`` maps a topic name to the topic configs it is created
    with (``{"cleanup.policy": "compact"}``). Returns ``{name: True if created now,
    False if it existed}``.

    Raises :class:`ConfigError` for a partition count below 1 or an existing
    topic with a different count, and :class:`ServiceError` when the broker
    cannot be reached or refuses to create a topic.
    """
    for name, wanted in topics.items():
        if wanted < 1:
            raise ConfigError(f"topic {name!r}: partition count must be >= 1, got {wanted}")
    if not topics:
        return {}
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError

    bootstrap = client_options.get("bootstrap_servers", "?")
    admin = AIOKafkaAdminClient(request_timeout_ms=timeout_ms, **client_options)
    try:
        await admin.start()
        response = await admin.create_topics(
            [NewTopic(n, p, replication_factor, topic_configs=dict((configs or {}).get(n, {})))
             for n, p in topics.items()], timeout_ms=timeout_ms)
        created: dict[str, bool] = {}
        existing: list[str] = []
        for name, code, message in _topic_errors(response):
            if code == 0:
                created[name] = True
            elif code == _TOPIC_ALREADY_EXISTS:
                existing.append(name)
            else:
                raise ServiceError(
                    f"Kafka at {bootstrap} refused to create topic {name!r} "
                    f"(error {code}: {message or 'no message'})"
                )
        checked = [n for n in existing if n not in any_count]
        created.update({n: False for n in existing if n in any_count})
        if checked:
            for name, found in (await _partition_counts(admin, checked)).items():
                if found != topics[name]:
                    raise ConfigError(
                        f"topic {name!r} exists with {found} partitions but {topics[name]} "
                        f"are wanted; delete the topic or use {found} partitions"
                    )
                created[name] = False
    except KafkaError as e:
        raise ServiceError(f"could not create topics on Kafka at {bootstrap}: {e!r}") from e
    finally:
        await admin.close()
    for name, new in created.items():
        if new or name not in any_count:
            log.info("topic %s %s with %s partitions",
                     name, "created" if new else "exists", topics[name])
        else:
            log.info("topic %s exists", name)
    return created


def changelog_topic(settings: Settings) -> str:
    """The worker's changelog topic (the name ``agents.app`` gives its table's changelog)."""
    return f"{settings.app_id}-state-changelog"


def leader_topic(settings: Settings) -> str:
    """Faust's leader-election topic of the app (``faust.assignor.LeaderAssignor``)."""
    return f"{settings.app_id}-__assignor-__leader"


def commpipe_topics(settings: Settings) -> dict[str, tuple[int, dict[str, str]]]:
    """``{name: (partitions, configs)}`` of every topic the worker uses (module docstring),
    with ``settings.otlp_topic`` when set (see :func:`otlp_topics`)."""
    topics = _own_topics(settings)
    for name in otlp_topics(settings, topics):
        topics[name] = (settings.partitions, topics[settings.topic][1])  # the input's configs
    return topics


def _own_topics(settings: Settings) -> dict[str, tuple[int, dict[str, str]]]:
    replicas = ({"min.insync.replicas": str(settings.topic_min_insync_replicas)}
                if settings.topic_min_insync_replicas else {})
    n = settings.partitions
    return {
        settings.topic: (n, {"cleanup.policy": "delete",
                             "retention.ms": str(settings.topic_retention_ms), **replicas}),
        settings.dlq_topic: (n, {"cleanup.policy": "delete",
                                 "retention.ms": str(settings.dlq_retention_ms), **replicas}),
        changelog_topic(settings): (n, {"cleanup.policy": "compact", **replicas}),
        leader_topic(settings): (1, {**replicas}),
    }


def otlp_topics(settings: Settings, ours: Mapping[str, Any] = ()) -> frozenset[str]:
    """``settings.otlp_topic`` (when set and not one of ``ours``): created with
    ``settings.partitions`` and the input's configs when missing, left as it is when it
    exists. The OTLP bridge reads any partition count (its records are keyed again by edge),
    and the topic may be the Collector's already."""
    if not settings.otlp_topic:
        return frozenset()
    return frozenset((settings.otlp_topic,)) - set(ours)


async def ensure_commpipe_topics(settings: Settings) -> dict[str, bool]:
    """Create every topic of :func:`commpipe_topics` that does not exist yet."""
    topics = commpipe_topics(settings)
    return await ensure_topics(
        {name: n for name, (n, _) in topics.items()},
        client_options=settings.kafka_client_options(),
        replication_factor=settings.topic_replication_factor,
        configs={name: configs for name, (_, configs) in topics.items()},
        any_count=otlp_topics(settings, _own_topics(settings)),
    )


async def wait_and_ensure_commpipe_topics(
    settings: Settings, *, wait_s: float, on_retry: Callable[[str], None],
    pause_s: float = 1.0,
) -> dict[str, bool]:
    """:func:`ensure_commpipe_topics`, retrying while the broker cannot be reached, for up to
    ``wait_s`` seconds (``on_retry(message)`` before each retry); other errors at once."""
    from aiokafka.errors import KafkaConnectionError

    deadline = time.monotonic() + wait_s
    attempt = 1
    while True:
        try:
            return await ensure_commpipe_topics(settings)
        except ServiceError as e:
            left = deadline - time.monotonic()
            if not isinstance(e.__cause__, KafkaConnectionError) or left <= 0:
                raise
            on_retry(f"Kafka at {settings.kafka_bootstrap} is not reachable yet (attempt "
                     f"{attempt}); retrying for up to {left:.0f} s more "
                     f"(COMMPIPE_BROKER_WAIT_S={wait_s:g})")
            attempt += 1
            await asyncio.sleep(min(pause_s, max(left, 0.0)))


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    """``(topic, error_code, error_message)`` per topic of any CreateTopics response version."""
    rows = []
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        rows.append((name, code, message))
    return rows


async def _partition_counts(admin: Any, names: list[str]) -> dict[str, int]:
    """Partition count of each existing topic in ``names`` (one metadata request)."""
    counts: dict[str, int] = {}
    for topic in await admin.describe_topics(names):
        if topic["error_code"]:
            raise ServiceError(
                f"could not read topic {topic['topic']!r} (error {topic['error_code']})"
            )
        counts[topic["topic"]] = len(topic["partitions"])
    return counts
