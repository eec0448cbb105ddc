"""One ``Settings`` object, read from ``COMMPIPE_*`` environment variables in one place.

Only entry points (the CLI, the emitter's defaults, test fixtures) call
:meth:`Settings.from_env`; everything else receives a ``Settings`` (or plain
arguments) from its caller. Secrets are held as :class:`Secret`, whose ``repr``
and ``str`` never show the value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

from pipeline.errors import ConfigError

__all__ = ["MAX_UNWRITTEN_RECORDS", "MAX_WORKER_BATCH_RECORDS", "Secret", "Settings",
           "parse_buckets", "redact_dsn", "scrub_dsn", "unknown_variables"]

PREFIX = "COMMPIPE_"

MAX_WORKER_BATCH_RECORDS = 512  # most records the worker takes per batch

MAX_UNWRITTEN_RECORDS = 4096
"""Most records of one partition whose changes wait in the worker's cache, unwritten: an
edge remembers the offsets of this many records it skipped as copies
(:data:`pipeline.core.dedup.MAX_DUP_OFFSETS`), so that replaying them after a crash
decides as the first run did."""


class Secret:
    """A string that does not print itself (passwords, DSNs with credentials)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact_dsn(dsn: str) -> str:
    """``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``; key=value DSNs too."""
    dsn = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn, flags=re.IGNORECASE)


def scrub_dsn(text: str, dsn: str) -> str:
    """``text`` (an error message) with ``dsn`` and its password, however spelled, masked."""
    text = text.replace(dsn, redact_dsn(dsn))
    found = re.search(r"://[^:/@\s]*:([^@\s]+)@", dsn) or re.search(
        r"password\s*=\s*(?:'([^']*)'|(\S+))", dsn, flags=re.IGNORECASE)
    password = next((g for g in found.groups() if g), None) if found else None
    return text.replace(password, "***") if password else text


SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
LOG_LEVELS = ("critical", "error", "warn", "warning", "info", "debug")
OTHER_VARIABLES = frozenset(PREFIX + name for name in (
    "SQL_DIR", "KAFKA_VERSION", "TEST_SERVICES", "TEST_BROKER", "TEST_WORKER_LOGLEVEL",
    "TEST_FAULT", "TEST_FAULT_FILE", "SOAK_S", "CHAOS_KILLS", "KEEP_SCREENSHOT"))
"""Read outside Settings (migrations, tests)."""
_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,200}")
_MOST = {"partitions": 10_000, "shim_buffer_size": 100_000_000,
         "worker_fetch_wait_ms": 60_000, "worker_producer_batch_bytes": 64 << 20,
         "metrics_render_processes": 64}
"""Upper bounds of settings whose absurd values would otherwise be tried (10,000
partitions is past what one Kafka cluster serves well per topic)."""

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
BacklogPolicy = Literal["pause", "drop"]

# What the worker's decoder accepts in one record (pipeline.wire.decode.MAX_RECORD_BYTES and
# MAX_BATCH_EVENTS; this root module cannot import wire, tests/unit/test_settings.py keeps
# them equal): the shim's batches must stay within them.
WORKER_RECORD_BYTES = 1024 * 1024
WORKER_BATCH_EVENTS = 10_000


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob of commpipe. Environment variable = ``COMMPIPE_`` + upper-case field name."""

    # Kafka
    kafka_bootstrap: str = "localhost:9092"
    """Comma-separated bootstrap servers."""
    topic: str = "comm.events"
    """Input topic the shim writes to and the worker reads."""
    dlq_topic: str = "comm.events.dlq"
    """Dead letters: invalid records with their reason and original bytes."""
    partitions: int = 4
    """Partition count topics are created with (tables' changelogs must match it)."""
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when the protocol is SASL_*."""
    kafka_sasl_username: str | None = None
    kafka_sasl_password: Secret = field(default_factory=lambda: Secret(""))
    kafka_ssl_cafile: str | None = None
    topic_replication_factor: int = 1
    """Replicas of every topic commpipe creates (input, dead letters, the worker's changelog
    and Faust's leader topic): 1 suits one dev broker, 3 a production cluster."""
    topic_min_insync_replicas: int | None = None
    """``min.insync.replicas`` of those topics (unset: the broker's default). With acks=all
    (the shim and the worker) a write is acknowledged once this many replicas hold it;
    2 with a replication factor of 3 survives the loss of any one broker."""
    topic_retention_ms: int = 7 * 24 * 3600 * 1000
    """``retention.ms`` of the input topic (7 days; -1 keeps records for ever)."""
    dlq_retention_ms: int = 30 * 24 * 3600 * 1000
    """``retention.ms`` of the dead-letter topic (30 days: time to look at bad input)."""

    # The shim
    shim_buffer_size: int = 100_000
    """Events held while the broker is slow or away; beyond it emits are dropped and counted."""
    shim_buffer_bytes: int = 64 * 1024 * 1024
    """Bytes held (the events' JSON as emitted, error messages already cut to 1,024
    characters) while the broker is slow or away; beyond it emits are dropped and counted."""
    shim_linger_ms: float = 500.0
    """How long the sender lets events gather before a round sends them, one record per
    edge. A record's size, not the event rate, decides what it costs the worker (a Kafka
    record costs Faust ~150 us before commpipe's code runs), and a fleet of instances each
    calling a few edges sends few events per record: at 50 ms, ~2 per record in the
    fleet benchmark; at 500 ms, ~9. Events reach ``/metrics`` this much later at most
    (``flush()`` sends at once); the freshness benchmark keeps emit -> ``/metrics`` p99
    under 2 s with the defaults."""
    shim_batch_events: int = 500
    """Most events in one Kafka record (one edge's batch); at most 10,000 (the worker's)."""
    shim_batch_bytes: int = 512 * 1024
    """Most bytes in one Kafka record; at most 1 MiB (the worker's), and keep it below the
    broker's message.max.bytes."""
    shim_request_timeout_ms: int = 10_000
    """Producer request timeout; a send that fails this way is retried, not lost."""
    shim_close_timeout_s: float = 5.0
    """How long ``close()`` (and interpreter exit) waits for buffered events to be sent."""

    # The stream job
    app_id: str = "commpipe"
    """Faust app id: the consumer group and the prefix of the changelog topic."""
    window_s: float = 10.0
    """Tumbling event-time window length."""
    grace_s: float = 10.0
    """How long after its end a window still accepts events; later ones count as late."""
    max_future_s: float = 300.0
    """Events stamped further ahead of their Kafka record's timestamp are dead-lettered."""
    idle_close_s: float = 30.0
    """A partition silent this long (worker clock) closes its open windows."""
    breaker_failure_threshold: int = 3
    breaker_recovery_timeout_s: float = 1.0
    breaker_half_open_probes: int = 1
    worker_batch_records: int = 500
    """Most records one fetch hands the worker, over all its partitions (each record
    carries one event or many; at most :data:`MAX_WORKER_BATCH_RECORDS`)."""
    worker_cache_interval_s: float = 0.25
    """How often the worker commits: the changes gathered since the last commit are
    written to its table and changelog, each changed key once (Kafka Streams' record
    cache), and once delivered the input offsets are committed. 0: after every fetch."""
    worker_fetch_wait_ms: int = 100
    """How long the worker's fetch waits for data when its partitions have none (Faust fixes
    1,500 ms, and aiokafka sends no other fetch meanwhile: a worker catching up stalled)."""
    edge_expire_s: float = 86_400.0
    """How long an edge must be silent (no record, by the worker's clock) before its state
    leaves the worker's memory, with its stored windows (agents/expiry.py); 0: never."""
    worker_datadir: str = ".commpipe/worker"
    broker_session_timeout_s: float = 60.0
    """Kafka consumer session timeout; 6 s makes dev and tests join in seconds."""
    broker_heartbeat_interval_s: float = 3.0
    broker_wait_s: float = 60.0
    """How long ``commpipe worker`` waits at start for a broker that cannot be reached yet
    (retrying every second, one line each); 0: fail at once."""
    worker_loglevel: str = "info"
    otlp_topic: str = ""
    """OpenTelemetry spans in: a topic the Collector's Kafka exporter writes (``otlp_spans``,
    ``otlp_proto`` or ``otlp_json``); the worker turns its CLIENT and PRODUCER spans into
    events on ``topic`` (agents/otlp.py). Empty (the default): off."""
    otlp_auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    """Where the OTLP bridge starts reading a partition it has never committed: ``earliest``
    (every span the topic still holds) or ``latest`` (only spans written from now on)."""
    worker_producer_batch_bytes: int = 1_000_000
    """Largest batch of the worker's producer (changelog, dead letters); keep it under the
    broker's ``message.max.bytes`` (1 MiB by default)."""
    worker_changelog_last_alone: bool = False
    """Send each changelog write's last record in a batch of its own, for a broker that
    reports a partition's end as its last batch's *first* offset + 1 (the embedded Tansu
    broker; the dev commands and tests set it there). Apache Kafka needs nothing of it."""

    # PostgreSQL / DuckDB
    postgres_dsn: Secret = field(default_factory=lambda: Secret(""))
    """PostgreSQL connection string; empty = embedded PostgreSQL in dev commands."""
    postgres_sslmode: str | None = None
    """libpq ``sslmode`` (``require``, ``verify-full`` ...) applied to every PostgreSQL
    connection (sink, migrations, queries), over whatever the DSN says."""
    duckdb_path: str = "commpipe.duckdb"
    """The DuckDB file the sink writes (empty: no DuckDB sink). Readers use ``commpipe
    query``, which waits out the sink's short writes instead of failing on the lock."""

    # The sink (runs inside each worker, for the partitions it owns)
    sink_interval_s: float = 1.0
    """How often the sink looks for closed windows and kept events to store."""
    sink_batch_rows: int = 50_000
    """Most windows (or events) per database transaction (each transaction also recomputes
    the patterns of the edges it touched: larger ones amortise that)."""
    sink_max_backlog: int = 250_000
    """Most closed windows plus kept events the worker holds for a database that has not
    stored them (one that is away); past it ``sink_backlog_policy`` applies. 0: no bound."""
    sink_backlog_policy: BacklogPolicy = "pause"
    """``pause``: stop reading the input until the backlog is down to half the bound (Kafka
    keeps the records; nothing is lost while its retention lasts). ``drop``: keep reading,
    and give up that database's copy of the oldest final windows and kept events beyond
    the bound (counted per database, logged)."""
    sink_backoff_max_s: float = 30.0
    """Longest wait between retries while a database is away (exponential from 0.5 s)."""
    sink_auto_migrate: bool = True
    """Apply pending migrations when the sink first connects (off: fail until migrated)."""
    retain_without_sink_s: float = 3_600.0
    """With no database configured, closed windows leave the worker's table this long
    (event time) after they close; with one, as soon as every database has stored them."""
    slo_file: str = ""
    """YAML or TOML file of service-level objectives (:mod:`pipeline.core.slo`); empty: the
    specification's numbers."""
    patterns_lookback_s: float = 300.0
    """``communication_patterns`` describes each edge over this much recent history."""

    # Prometheus
    metrics_port: int = 9464
    """Port of each worker's ``/metrics`` (0: no HTTP server)."""
    metrics_host: str = "127.0.0.1"
    """Address ``/metrics`` binds to: loopback unless set (``0.0.0.0`` in a container that
    Prometheus scrapes from outside)."""
    metrics_namespace: str = "commpipe"
    """Metric name prefix; ``domainflow`` gives the specification's names."""
    metrics_stale_s: float = 300.0
    """An edge without events for this long (worker clock) leaves ``/metrics``."""
    metrics_max_series: int = 400_000
    """Most per-edge series one worker reports (about 35 per edge: 10,000 edges fit); edges
    past it are refused, newest first, and counted (``exporter_edges_refused``)."""
    metrics_render_processes: int = 2
    """Processes a ``/metrics`` render shares its edges over, from 2,000 edges each."""
    metrics_latency_buckets: str = "0.005,0.01,0.025,0.05,0.1,0.25,0.5,1.0,2.5,10.0"
    """Bounds (seconds) of the latency histogram in ``/metrics``: a subset of 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60 (what is stored)."""

    def postgres_conninfo(self) -> str:
        """The DSN every PostgreSQL connection uses: ``postgres_dsn`` with ``postgres_sslmode``
        applied (empty when no DSN is set)."""
        dsn = self.postgres_dsn.get()
        if not dsn or not self.postgres_sslmode:
            return dsn
        from psycopg.conninfo import make_conninfo

        try:
            return make_conninfo(dsn, sslmode=self.postgres_sslmode)
        except Exception as e:  # noqa: BLE001 - psycopg.ProgrammingError; text may quote the DSN
            raise ConfigError(f"COMMPIPE_POSTGRES_DSN is not a valid connection string "
                              f"({type(e).__name__})") from None

    def kafka_client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients: bootstrap servers plus any security settings."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            opts["sasl_mechanism"] = self.kafka_sasl_mechanism
            opts["sasl_plain_username"] = self.kafka_sasl_username
            opts["sasl_plain_password"] = self.kafka_sasl_password.get()
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            opts["ssl_context"] = create_ssl_context(cafile=self.kafka_ssl_cafile)
        return opts

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``COMMPIPE_*`` variables; keyword overrides win over them."""
        env = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = PREFIX + f.name.upper()
            if name in env:
                values[f.name] = _parse(name, env[name], hints[f.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting whose value cannot work."""
        positive = ("partitions", "shim_buffer_size", "shim_buffer_bytes", "shim_batch_events",
                    "shim_batch_bytes",
                    "shim_request_timeout_ms", "window_s", "worker_batch_records",
                    "broker_session_timeout_s", "broker_heartbeat_interval_s",
                    "breaker_failure_threshold", "breaker_half_open_probes", "sink_interval_s",
                    "sink_batch_rows", "sink_backoff_max_s", "patterns_lookback_s",
                    "metrics_stale_s", "metrics_max_series", "worker_producer_batch_bytes",
                    "metrics_render_processes")
        for f in dataclasses.fields(self):  # NaN passes every comparison: refuse it first
            value = getattr(self, f.name)
            if type(value) is float and not math.isfinite(value):
                raise ConfigError(f"{PREFIX}{f.name.upper()} must be a finite number, got "
                                  f"{value}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be > 0, got {getattr(self, name)}")
        for name in ("shim_linger_ms", "shim_close_timeout_s", "grace_s", "max_future_s",
                     "sink_max_backlog", "idle_close_s", "breaker_recovery_timeout_s",
                     "worker_cache_interval_s", "worker_fetch_wait_ms",
                     "retain_without_sink_s", "broker_wait_s", "edge_expire_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be >= 0, got {getattr(self, name)}")
        if self.topic_replication_factor < 1:
            raise ConfigError(f"{PREFIX}TOPIC_REPLICATION_FACTOR must be >= 1, got "
                              f"{self.topic_replication_factor}")
        if self.topic_min_insync_replicas is not None and not (
                1 <= self.topic_min_insync_replicas <= self.topic_replication_factor):
            raise ConfigError(
                f"{PREFIX}TOPIC_MIN_INSYNC_REPLICAS must be between 1 and "
                f"{PREFIX}TOPIC_REPLICATION_FACTOR ({self.topic_replication_factor}), got "
                f"{self.topic_min_insync_replicas}")
        for name in ("topic_retention_ms", "dlq_retention_ms"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                raise ConfigError(f"{PREFIX}{name.upper()} must be > 0, or -1 to keep records "
                                  f"for ever, got {getattr(self, name)}")
        for name, most, what in (
                ("shim_batch_bytes", WORKER_RECORD_BYTES, "the largest record"),
                ("shim_batch_events", WORKER_BATCH_EVENTS, "the most events of one record")):
            if getattr(self, name) > most:
                raise ConfigError(f"{PREFIX}{name.upper()} must be at most {most} ({what} the "
                                  f"worker accepts), got {getattr(self, name)}")
        for name, most in (*_MOST.items(), ("worker_batch_records", MAX_WORKER_BATCH_RECORDS)):
            if getattr(self, name) > most:
                raise ConfigError(f"{PREFIX}{name.upper()} must be at most {most:,}, got "
                                  f"{getattr(self, name):,}")
        for name in ("topic", "dlq_topic", "app_id"):
            if not _TOPIC.fullmatch(getattr(self, name)):
                raise ConfigError(f"{PREFIX}{name.upper()} must be 1-200 characters of "
                                  f"[a-zA-Z0-9._-] (a Kafka topic name), got "
                                  f"{getattr(self, name)!r}")
        if self.topic == self.dlq_topic:
            raise ConfigError(f"{PREFIX}DLQ_TOPIC must differ from {PREFIX}TOPIC "
                              f"({self.topic!r})")
        if self.kafka_sasl_mechanism is not None and (
                self.kafka_sasl_mechanism not in SASL_MECHANISMS):
            raise ConfigError(f"{PREFIX}KAFKA_SASL_MECHANISM must be one of "
                              f"{', '.join(SASL_MECHANISMS)}; got {self.kafka_sasl_mechanism!r}")
        if self.worker_loglevel.lower() not in LOG_LEVELS:
            raise ConfigError(f"{PREFIX}WORKER_LOGLEVEL must be one of {', '.join(LOG_LEVELS)}; "
                              f"got {self.worker_loglevel!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"{PREFIX}METRICS_PORT must be 0-65535, got {self.metrics_port}")
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", self.metrics_namespace):
            raise ConfigError(f"{PREFIX}METRICS_NAMESPACE must be a Prometheus name prefix "
                              f"([a-zA-Z_:][a-zA-Z0-9_:]*), got {self.metrics_namespace!r}")
        try:
            parse_buckets(self.metrics_latency_buckets)
        except ValueError as e:
            raise ConfigError(f"{PREFIX}METRICS_LATENCY_BUCKETS {e}") from None
        if not self.kafka_bootstrap.strip():
            raise ConfigError(f"{PREFIX}KAFKA_BOOTSTRAP is empty; set it to host:port[,host:port]")
        for name in ("topic", "dlq_topic"):
            if self.otlp_topic and self.otlp_topic == getattr(self, name):
                raise ConfigError(
                    f"{PREFIX}OTLP_TOPIC is {PREFIX}{name.upper()} ({self.otlp_topic!r}): the "
                    "OTLP bridge would read what the worker writes there; set it to the topic "
                    "the Collector's Kafka exporter writes (otlp_spans by default)")


STORED_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
"""The latency bounds each edge's totals keep (pipeline.core.totals.LATENCY_BUCKETS_S; this
root module cannot import core, tests/unit/test_settings.py keeps them equal)."""


def parse_buckets(text: str) -> tuple[float, ...]:
    """Reported bounds from ``"0.005,0.01,..."``: a non-empty, increasing subset of
    :data:`STORED_BUCKETS_S`; ValueError saying so otherwise."""
    try:
        bounds = tuple(float(b) for b in text.split(",") if b.strip())
    except ValueError:
        bounds = ()
    if (not bounds or any(b not in STORED_BUCKETS_S for b in bounds)
            or list(bounds) != sorted(set(bounds))):
        raise ValueError("must be increasing bounds in seconds, comma-separated, from "
                         + ",".join(repr(b) for b in STORED_BUCKETS_S) + f"; got {text!r}")
    return bounds


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``COMMPIPE_*`` variable no setting reads (a misspelt name would
    otherwise be ignored silently), with the closest name when there is one."""
    import difflib

    env = os.environ if environ is None else environ
    known = {PREFIX + f.name.upper() for f in dataclasses.fields(Settings)} | OTHER_VARIABLES
    warnings = []
    for name in sorted(n for n in env if n.startswith(PREFIX) and n not in known):
        close = difflib.get_close_matches(name[len(PREFIX):],
                                          sorted(k[len(PREFIX):] for k in known), n=1)
        hint = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
        warnings.append(f"{name} is not a commpipe setting and is ignored{hint}")
    return warnings


def _parse(name: str, raw: str, hint: Any) -> Any:
    """Turn one environment string into the field's type, or say clearly why not."""
    if hint is Secret:
        return Secret(raw)
    args = [a for a in get_args(hint) if a is not type(None)]
    if getattr(hint, "__origin__", None) is Literal:
        if raw not in get_args(hint):
            raise ConfigError(f"{name} must be one of {', '.join(get_args(hint))}; got {raw!r}")
        return raw
    base = args[0] if args else hint
    if raw == "" and type(None) in get_args(hint):
        return None
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base in (int, float):
            return base(raw)
    except ValueError:
        wanted = {int: "an integer", float: "a number", bool: "true or false"}[base]
        raise ConfigError(f"{name} must be {wanted}; got {raw!r}") from None
    return raw
