"""Fetching Apache Kafka's jars and finding Java: the decisions and the errors, without Maven."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.dev import kafka_dist
from pipeline.dev.kafka import new_cluster_id
from pipeline.errors import ConfigError, ServiceError


@pytest.mark.parametrize(("text", "major"), [
    ('openjdk version "17.0.15" 2025-04-15', 17),
    ('openjdk version "21" 2023-09-19', 21),
    ('java version "1.8.0_392"', 8),
    ('openjdk version "11.0.2"', 11),
    ("no version here", None),
])
def test_java_major(text: str, major: int | None) -> None:
    assert kafka_dist._java_major(text) == major  # noqa: SLF001


def _fake_java(tmp_path: Path, version: str) -> Path:
    home = tmp_path / f"jdk{version}"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\"' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    return home


def test_java_home_is_used_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path, "17.0.1")))
    assert kafka_dist.java_binary() == tmp_path / "jdk17.0.1" / "bin" / "java"
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path, "11.0.2")))
    with pytest.raises(ServiceError) as info:
        kafka_dist.java_binary()
    message = str(info.value)
    assert "needs Java 17 or newer" in message and "is Java 11" in message
    assert "\n" not in message


def test_no_java_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(ServiceError) as info:
        kafka_dist.java_binary()
    message = str(info.value)
    assert message.startswith("Apache Kafka needs Java 17 or newer, and no java was found")
    assert "openjdk-17-jre-headless" in message and "--engine tansu" in message
    assert "\n" not in message


def test_no_maven_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceError) as info:
        kafka_dist.kafka_libs("4.1.1", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith("fetching Apache Kafka's jars needs Maven, and no mvn was found")
    assert str(tmp_path / "cache" / "4.1.1" / "libs") in message and "\n" not in message


def test_a_complete_cache_needs_no_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libs = tmp_path / "4.1.1" / "libs"
    libs.mkdir(parents=True)
    (libs / ".complete").write_text("4.1.1\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kafka_dist.kafka_libs("4.1.1", cache_dir=tmp_path) == libs


def test_an_interrupted_fetch_is_fetched_again(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Jars without the .complete marker (a fetch that stopped half-way) are not used: Maven
    runs again, and its result replaces them."""
    libs = tmp_path / "4.1.1" / "libs"
    libs.mkdir(parents=True)
    (libs / "half.jar").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"  # copies two jars to -DoutputDirectory, as the real goal does
    mvn.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -DoutputDirectory=*) '
                   'd="${a#-DoutputDirectory=}";; esac; done\nmkdir -p "$d"\n'
                   'touch "$d/kafka_2.13-4.1.1.jar" "$d/kafka-clients-4.1.1.jar"\n')
    mvn.chmod(mvn.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/bin{os.pathsep}/usr/bin")
    assert kafka_dist.kafka_libs("4.1.1", cache_dir=tmp_path) == libs
    assert sorted(p.name for p in libs.iterdir()) == [
        ".complete", "kafka-clients-4.1.1.jar", "kafka_2.13-4.1.1.jar"]
    assert [p.name for p in (tmp_path / "4.1.1").iterdir() if p.name.startswith("fetch-")] == []


def test_maven_failure_quotes_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text("#!/bin/sh\necho '[ERROR] Could not resolve kafka_2.13:9.9.9'\nexit 1\n")
    mvn.chmod(mvn.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/bin{os.pathsep}/usr/bin")
    with pytest.raises(ServiceError) as info:
        kafka_dist.kafka_libs("9.9.9", cache_dir=tmp_path / "cache")
    first, _, rest = str(info.value).partition("\n")
    assert first.startswith("Maven could not fetch Apache Kafka 9.9.9 (exit code 1)")
    assert "Could not resolve kafka_2.13:9.9.9" in rest
    assert not (tmp_path / "cache" / "9.9.9" / "libs").exists()


@pytest.mark.parametrize("bad", ["latest", "4.1", "4.1.1; rm -rf /", "../4.1.1"])
def test_malformed_versions_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        kafka_dist.kafka_libs(bad, cache_dir=tmp_path)


def test_the_pom_names_a_4x_version() -> None:
    version = kafka_dist.pom_version()
    assert version.split(".")[0] == "4", version
    assert (kafka_dist.DIST_DIR / "server.properties").exists()
    assert (kafka_dist.DIST_DIR / "log4j2.properties").exists()


def test_cluster_ids_never_look_like_options() -> None:
    ids = {new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
