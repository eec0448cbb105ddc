"""The topics the worker uses and the configs they are created with (no broker)."""

from __future__ import annotations

import pytest

from agents.topics import changelog_topic, commpipe_topics, leader_topic
from pipeline.errors import ConfigError
from pipeline.settings import Settings


def test_every_topic_with_its_configs_by_default() -> None:
    s = Settings.from_env({}, app_id="app1", partitions=6)
    assert commpipe_topics(s) == {
        "comm.events": (6, {"cleanup.policy": "delete", "retention.ms": "604800000"}),
        "comm.events.dlq": (6, {"cleanup.policy": "delete", "retention.ms": "2592000000"}),
        "app1-state-changelog": (6, {"cleanup.policy": "compact"}),
        "app1-__assignor-__leader": (1, {}),
    }
    assert changelog_topic(s) == "app1-state-changelog"
    assert leader_topic(s) == "app1-__assignor-__leader"


def test_a_cluster_s_settings_reach_every_topic() -> None:
    env = {"COMMPIPE_TOPIC_REPLICATION_FACTOR": "3", "COMMPIPE_TOPIC_MIN_INSYNC_REPLICAS": "2",
           "COMMPIPE_TOPIC_RETENTION_MS": "-1", "COMMPIPE_DLQ_RETENTION_MS": "86400000"}
    s = Settings.from_env(env)
    assert s.topic_replication_factor == 3
    topics = commpipe_topics(s)
    assert {name: c.get("min.insync.replicas") for name, (_, c) in topics.items()} == dict.fromkeys(
        topics, "2")
    assert topics["comm.events"][1]["retention.ms"] == "-1"
    assert topics["comm.events.dlq"][1]["retention.ms"] == "86400000"
    assert "retention.ms" not in topics["commpipe-state-changelog"][1]  # compacted, never aged


@pytest.mark.parametrize(("env", "message"), [
    ({"COMMPIPE_TOPIC_REPLICATION_FACTOR": "0"}, "COMMPIPE_TOPIC_REPLICATION_FACTOR must be >= 1"),
    ({"COMMPIPE_TOPIC_MIN_INSYNC_REPLICAS": "2"},
     "COMMPIPE_TOPIC_MIN_INSYNC_REPLICAS must be between 1 and COMMPIPE_TOPIC_REPLICATION_FACTOR"
     " (1), got 2"),
    ({"COMMPIPE_TOPIC_REPLICATION_FACTOR": "3", "COMMPIPE_TOPIC_MIN_INSYNC_REPLICAS": "0"},
     "COMMPIPE_TOPIC_MIN_INSYNC_REPLICAS must be between 1"),
    ({"COMMPIPE_TOPIC_RETENTION_MS": "0"}, "COMMPIPE_TOPIC_RETENTION_MS must be > 0, or -1"),
    ({"COMMPIPE_DLQ_RETENTION_MS": "-5"}, "COMMPIPE_DLQ_RETENTION_MS must be > 0, or -1"),
])
def test_settings_that_cannot_work_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert message in str(info.value)
