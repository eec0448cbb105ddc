"""Where test services come from: ``COMMPIPE_TEST_SERVICES`` and the Docker probe."""

from __future__ import annotations

import pytest

from pipeline.dev.process import choose_test_services, docker_available
from pipeline.errors import CommpipeError, ConfigError


class Probe:
    """A Docker probe that answers ``answer`` (or raises ``error``) and counts its calls."""

    def __init__(self, answer: bool = False, error: Exception | None = None) -> None:
        self.answer = answer
        self.error = error
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.mark.parametrize(
    ("env_value", "docker", "expected", "probed"),
    [
        (None, True, "containers", 1),
        (None, False, "embedded", 1),
        ("", True, "containers", 1),
        ("   ", False, "embedded", 1),
        ("auto", True, "containers", 1),
        ("auto", False, "embedded", 1),
        ("AUTO", True, "containers", 1),
        ("embedded", True, "embedded", 0),
        ("embedded", False, "embedded", 0),
        (" Embedded ", True, "embedded", 0),
        ("containers", False, "containers", 0),
        ("containers", True, "containers", 0),
        ("CONTAINERS", False, "containers", 0),
    ],
)
def test_choice(env_value: str | None, docker: bool, expected: str, probed: int) -> None:
    probe = Probe(answer=docker)
    assert choose_test_services(env_value, probe) == expected
    assert probe.calls == probed


def test_failing_probe_means_embedded() -> None:
    probe = Probe(error=OSError("socket gone"))
    assert choose_test_services("auto", probe) == "embedded"
    assert probe.calls == 1


@pytest.mark.parametrize("bad", ["docker", "container", "yes", "embedded,containers"])
def test_unknown_value_is_a_config_error(bad: str) -> None:
    probe = Probe(answer=True)
    with pytest.raises(ConfigError) as info:
        choose_test_services(bad, probe)
    assert str(info.value) == (
        f"COMMPIPE_TEST_SERVICES must be one of auto, embedded, containers; got {bad!r}"
    )
    assert isinstance(info.value, CommpipeError)
    assert probe.calls == 0


def test_docker_probe_without_engine_is_false_and_quick(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    # Points at a socket path where nothing listens: the SDK fails, the probe says no.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    assert docker_available(timeout=1) is False
