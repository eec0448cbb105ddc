"""Apache Kafka's broker jars, fetched with Maven on first use, and the Java that runs them.

The repository holds the pom (``kafka-dist/pom.xml``, which names the version) and the
configuration templates, never jars. :func:`kafka_libs` copies the broker's runtime
dependencies from Maven Central (through the local Maven repository, ``~/.m2``) into
``<cache>/<version>/libs`` once; later calls find them there. The cache is outside the
repository: ``$XDG_CACHE_HOME/commpipe/kafka`` or ``~/.cache/commpipe/kafka`` unless a
``cache_dir`` is given. A download that stopped half-way is not used: the directory
counts only once the copy finished and was renamed into place, under a file lock so that
two test sessions never fetch into the same place at once.

Missing tools raise :class:`~pipeline.errors.ServiceError` in one line saying what to
install: :func:`java_binary` (Java 17 or newer, as Kafka 4 requires) and Maven's ``mvn``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.errors import ConfigError, ServiceError

__all__ = ["DIST_DIR", "default_cache_dir", "java_binary", "kafka_libs", "pom_version"]

log = logging.getLogger(__name__)

DIST_DIR = Path(__file__).with_name("kafka-dist")
"""The pom and the configuration templates (``server.properties``, ``log4j2.properties``)."""

MIN_JAVA = 17
_VERSION = re.compile(r"^\d+\.\d+\.\d+([.-][A-Za-z0-9]+)*$")


def pom_version(pom: Path = DIST_DIR / "pom.xml") -> str:
    """The ``kafka.version`` property of the pom: the version fetched unless told otherwise."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if not found:
        raise ConfigError(f"{pom} has no <kafka.version> property; restore the file from git")
    return found.group(1).strip()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/commpipe/kafka``, else ``~/.cache/commpipe/kafka``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "commpipe" / "kafka"


def java_binary() -> Path:
    """The ``java`` that runs the broker (``$JAVA_HOME/bin/java``, else the one on PATH),
    checked to be Java 17 or newer; :class:`ServiceError` otherwise."""
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    if candidate is None or not candidate.exists():
        found = shutil.which("java")
        if found is None:
            raise ServiceError(
                f"Apache Kafka needs Java {MIN_JAVA} or newer, and no java was found (JAVA_HOME "
                "unset, none on PATH): install a JDK or JRE, e.g. apt-get install "
                "openjdk-17-jre-headless, or use --engine tansu")
        candidate = Path(found)
    try:
        out = subprocess.run([str(candidate), "-version"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServiceError(f"{candidate} -version failed ({type(e).__name__}: {e}); "
                           f"install Java {MIN_JAVA} or newer or set JAVA_HOME") from e
    major = _java_major(out.stderr + out.stdout)
    if major is None or major < MIN_JAVA:
        raise ServiceError(
            f"Apache Kafka needs Java {MIN_JAVA} or newer; {candidate} is "
            f"{'of unknown version' if major is None else f'Java {major}'}: install a newer "
            "one or point JAVA_HOME at it")
    return candidate


def _java_major(text: str) -> int | None:
    """17 from ``openjdk version "17.0.15"``, 8 from ``java version "1.8.0_392"``."""
    found = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not found:
        return None
    first = int(found.group(1))
    return int(found.group(2) or 0) if first == 1 else first


def kafka_libs(version: str | None = None, *, cache_dir: Path | None = None,
               timeout: float = 900.0) -> Path:
    """The directory of the broker's jars for ``version`` (default: the pom's), fetched with
    Maven into the cache on first use. Raises :class:`ServiceError` when Maven is missing or
    fails (quoting the end of its output) and :class:`ConfigError` for a malformed version."""
    version = version or pom_version()
    if not _VERSION.match(version):
        raise ConfigError(f"Kafka version {version!r} is not of the form 4.1.1; "
                          "set COMMPIPE_KAFKA_VERSION to a released version")
    root = (cache_dir or default_cache_dir()) / version
    libs = root / "libs"
    if _complete(libs):
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be fetching the same version
        if not _complete(libs):
            _fetch(version, root, libs, timeout)
    return libs


def _complete(libs: Path) -> bool:
    return (libs / ".complete").exists()


def _fetch(version: str, root: Path, libs: Path, timeout: float) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError(
            "fetching Apache Kafka's jars needs Maven, and no mvn was found on PATH: install it "
            f"(e.g. apt-get install maven), or put the broker's jars in {libs} with an empty "
            "file .complete beside them, or use --engine tansu")
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=root))
    try:
        shutil.copy(DIST_DIR / "pom.xml", work / "pom.xml")  # Maven writes nothing in the repo
        out_dir = work / "libs"
        cmd = [mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(work / "pom.xml"),
               "dependency:copy-dependencies", "-DincludeScope=runtime",
               f"-DoutputDirectory={out_dir}", f"-Dkafka.version={version}"]
        log.info("fetching Apache Kafka %s with Maven into %s", version, libs)
        began = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                                  timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise ServiceError(f"Maven did not fetch Apache Kafka {version} within "
                               f"{timeout:.0f} s; check that Maven Central is reachable") from e
        jars = sorted(out_dir.glob("*.jar")) if out_dir.exists() else []
        if done.returncode != 0 or not any(j.name.startswith("kafka_2.13-") for j in jars):
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise ServiceError(
                f"Maven could not fetch Apache Kafka {version} (exit code {done.returncode}); "
                f"check the version and that Maven Central is reachable. Maven said:\n{tail}")
        (out_dir / ".complete").write_text(f"{version}\n")
        if libs.exists():  # a copy without its .complete marker: an interrupted fetch
            shutil.rmtree(libs)
        out_dir.rename(libs)
        log.info("Apache Kafka %s: %d jars in %.0f s", version, len(jars),
                 time.monotonic() - began)
    finally:
        shutil.rmtree(work, ignore_errors=True)
