"""Settings from COMMPIPE_* variables: parsing, validation and secrets that never print."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.core.slo import check_file
from pipeline.errors import ConfigError
from pipeline.settings import Secret, Settings, redact_dsn, unknown_variables


def test_defaults_without_environment() -> None:
    s = Settings.from_env({})
    assert (s.kafka_bootstrap, s.topic, s.dlq_topic, s.partitions) == (
        "localhost:9092", "comm.events", "comm.events.dlq", 4)
    assert s.shim_buffer_size == 100_000 and s.shim_linger_ms == 500.0
    assert s.worker_cache_interval_s == 0.25


def test_environment_values_are_typed() -> None:
    s = Settings.from_env({"COMMPIPE_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
                           "COMMPIPE_PARTITIONS": "8", "COMMPIPE_SHIM_LINGER_MS": "2.5",
                           "COMMPIPE_KAFKA_SASL_MECHANISM": "", "OTHER": "x"})
    assert (s.kafka_bootstrap, s.partitions, s.shim_linger_ms) == ("k1:9092,k2:9092", 8, 2.5)
    assert s.kafka_sasl_mechanism is None


def test_overrides_win_over_environment() -> None:
    s = Settings.from_env({"COMMPIPE_TOPIC": "from-env"}, topic="from-code", partitions=None)
    assert s.topic == "from-code" and s.partitions == 4


@pytest.mark.parametrize(
    ("env", "message"),
    [({"COMMPIPE_PARTITIONS": "four"}, "COMMPIPE_PARTITIONS must be an integer; got 'four'"),
     ({"COMMPIPE_PARTITIONS": "0"}, "COMMPIPE_PARTITIONS must be > 0, got 0"),
     ({"COMMPIPE_SHIM_LINGER_MS": "-1"}, "COMMPIPE_SHIM_LINGER_MS must be >= 0, got -1.0"),
     ({"COMMPIPE_KAFKA_SECURITY_PROTOCOL": "TLS"},
      "COMMPIPE_KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, "
      "SASL_SSL; got 'TLS'"),
     ({"COMMPIPE_KAFKA_BOOTSTRAP": " "}, "COMMPIPE_KAFKA_BOOTSTRAP is empty"),
     ({"COMMPIPE_WORKER_BATCH_RECORDS": "513"},
      "COMMPIPE_WORKER_BATCH_RECORDS must be at most 512, got 513"),
     ({"COMMPIPE_OTLP_TOPIC": "comm.events"},
      "COMMPIPE_OTLP_TOPIC is COMMPIPE_TOPIC ('comm.events'): the OTLP bridge would read what "
      "the worker writes there"),
     ({"COMMPIPE_OTLP_TOPIC": "x.dlq", "COMMPIPE_DLQ_TOPIC": "x.dlq"},
      "COMMPIPE_OTLP_TOPIC is COMMPIPE_DLQ_TOPIC ('x.dlq')"),
     ({"COMMPIPE_OTLP_AUTO_OFFSET_RESET": "none"},
      "COMMPIPE_OTLP_AUTO_OFFSET_RESET must be one of earliest, latest; got 'none'")],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [({"COMMPIPE_WINDOW_S": "nan"}, "COMMPIPE_WINDOW_S must be a finite number, got nan"),
     ({"COMMPIPE_GRACE_S": "nan"}, "COMMPIPE_GRACE_S must be a finite number, got nan"),
     ({"COMMPIPE_SHIM_CLOSE_TIMEOUT_S": "nan"},
      "COMMPIPE_SHIM_CLOSE_TIMEOUT_S must be a finite number, got nan"),
     ({"COMMPIPE_IDLE_CLOSE_S": "inf"}, "COMMPIPE_IDLE_CLOSE_S must be a finite number, got inf"),
     ({"COMMPIPE_METRICS_STALE_S": "1e400"},  # overflows to inf
      "COMMPIPE_METRICS_STALE_S must be a finite number, got inf"),
     ({"COMMPIPE_APP_ID": ""}, "COMMPIPE_APP_ID must be 1-200 characters of [a-zA-Z0-9._-] "
      "(a Kafka topic name), got ''"),
     ({"COMMPIPE_TOPIC": ""}, "COMMPIPE_TOPIC must be 1-200 characters"),
     ({"COMMPIPE_DLQ_TOPIC": "dead letters"}, "COMMPIPE_DLQ_TOPIC must be 1-200 characters"),
     ({"COMMPIPE_DLQ_TOPIC": "comm.events"},
      "COMMPIPE_DLQ_TOPIC must differ from COMMPIPE_TOPIC ('comm.events')"),
     ({"COMMPIPE_KAFKA_SASL_MECHANISM": "GSSAPI"}, "COMMPIPE_KAFKA_SASL_MECHANISM must be one "
      "of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; got 'GSSAPI'"),
     ({"COMMPIPE_WORKER_LOGLEVEL": "loud"}, "COMMPIPE_WORKER_LOGLEVEL must be one of "
      "critical, error, warn, warning, info, debug; got 'loud'"),
     ({"COMMPIPE_WORKER_FETCH_WAIT_MS": "-1"}, "COMMPIPE_WORKER_FETCH_WAIT_MS must be >= 0, "
      "got -1"),
     ({"COMMPIPE_WORKER_PRODUCER_BATCH_BYTES": "-5"},
      "COMMPIPE_WORKER_PRODUCER_BATCH_BYTES must be > 0, got -5"),
     ({"COMMPIPE_RETAIN_WITHOUT_SINK_S": "-1"},
      "COMMPIPE_RETAIN_WITHOUT_SINK_S must be >= 0, got -1.0"),
     ({"COMMPIPE_PARTITIONS": "100000000"},
      "COMMPIPE_PARTITIONS must be at most 10,000, got 100,000,000"),
     ({"COMMPIPE_METRICS_MAX_SERIES": "0"}, "COMMPIPE_METRICS_MAX_SERIES must be > 0, got 0"),
     ({"COMMPIPE_METRICS_LATENCY_BUCKETS": "0.2,1"},
      "COMMPIPE_METRICS_LATENCY_BUCKETS must be increasing bounds in seconds")],
)
def test_values_that_cannot_work_are_refused_naming_the_variable(
        env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(message)


def test_the_worker_refuses_a_missing_or_bad_objectives_file(tmp_path: Any) -> None:
    settings = Settings.from_env({"COMMPIPE_SLO_FILE": str(tmp_path / "slo.toml")})
    with pytest.raises(ConfigError) as info:
        check_file(settings.slo_file)
    assert str(info.value) == f"COMMPIPE_SLO_FILE: no such file {str(tmp_path / 'slo.toml')!r}"
    (tmp_path / "slo.toml").write_text("latency_p95_ms = -1\n")
    with pytest.raises(ConfigError, match="^COMMPIPE_SLO_FILE: .*latency_p95_ms"):
        check_file(settings.slo_file)
    (tmp_path / "slo.toml").write_text("latency_p95_ms = 50\n")
    check_file(settings.slo_file)


def test_a_misspelt_variable_is_named_with_the_closest_setting() -> None:
    assert unknown_variables({"COMMPIPE_WINDOWS_S": "5", "COMMPIPE_TOPIC": "x",
                              "COMMPIPE_SQL_DIR": "/s", "OTHER_WINDOW_S": "1",
                              "COMMPIPE_ZZZ": "1"}) == [
        "COMMPIPE_WINDOWS_S is not a commpipe setting and is ignored (did you mean "
        "COMMPIPE_WINDOW_S?)",
        "COMMPIPE_ZZZ is not a commpipe setting and is ignored"]


def test_the_default_histogram_bounds_are_the_exporters() -> None:
    from pipeline.core.totals import DEFAULT_BUCKETS_S, LATENCY_BUCKETS_S
    from pipeline.settings import STORED_BUCKETS_S, parse_buckets

    assert parse_buckets(Settings().metrics_latency_buckets) == DEFAULT_BUCKETS_S
    assert STORED_BUCKETS_S == LATENCY_BUCKETS_S


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting\\(s\\): bogus"):
        Settings.from_env({}, bogus=1)


def test_secrets_never_print() -> None:
    s = Settings.from_env({"COMMPIPE_POSTGRES_DSN": "postgresql://u:hunter2@db/x",
                           "COMMPIPE_KAFKA_SASL_PASSWORD": "hunter3"})
    assert s.postgres_dsn.get() == "postgresql://u:hunter2@db/x"
    shown = repr(s) + str(s) + f"{s.kafka_sasl_password}"
    assert "hunter2" not in shown and "hunter3" not in shown
    assert repr(Secret("")) == "Secret('')" and not Secret("")


def test_kafka_client_options_pass_security_through() -> None:
    s = Settings.from_env({"COMMPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                           "COMMPIPE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
                           "COMMPIPE_KAFKA_SASL_USERNAME": "svc",
                           "COMMPIPE_KAFKA_SASL_PASSWORD": "pw"})
    assert s.kafka_client_options() == {
        "bootstrap_servers": "localhost:9092", "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "svc",
        "sasl_plain_password": "pw"}
    assert Settings.from_env({}).kafka_client_options() == {
        "bootstrap_servers": "localhost:9092", "security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
     ("postgresql://u@h/db", "postgresql://u@h/db"),
     ("host=h password=secret user=u", "host=h password=*** user=u"),
     ("host=h password='a b' user=u", "host=h password=*** user=u")],
)
def test_redact_dsn(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_worker_security_settings_reach_faust_and_metrics_bind_loopback() -> None:
    import ssl

    from agents.app import create_app

    default = create_app(Settings.from_env({}))
    assert default.metrics_server.host == "127.0.0.1"
    assert default.app.conf.web_enabled is False  # Faust's pages show table contents
    assert default.app.conf.broker_credentials is None
    s = Settings.from_env({"COMMPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                           "COMMPIPE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                           "COMMPIPE_KAFKA_SASL_USERNAME": "svc",
                           "COMMPIPE_KAFKA_SASL_PASSWORD": "pw",
                           "COMMPIPE_METRICS_HOST": "0.0.0.0"})
    pipeline = create_app(s)
    credentials = pipeline.app.conf.broker_credentials
    assert (credentials.username, credentials.password) == ("svc", "pw")
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.protocol.value == "SASL_SSL"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    assert (pipeline.metrics_server.host, pipeline.metrics_server.port) == ("0.0.0.0", 9464)
    assert isinstance(s.kafka_client_options()["ssl_context"], ssl.SSLContext)


def test_postgres_sslmode_applies_to_the_dsn_without_showing_it() -> None:
    from psycopg.conninfo import conninfo_to_dict

    s = Settings.from_env({"COMMPIPE_POSTGRES_DSN": "postgresql://u:hunter2@db:5433/x",
                           "COMMPIPE_POSTGRES_SSLMODE": "verify-full"})
    assert conninfo_to_dict(s.postgres_conninfo()) == {
        "user": "u", "password": "hunter2", "host": "db", "port": "5433", "dbname": "x",
        "sslmode": "verify-full"}
    plain = Settings.from_env({"COMMPIPE_POSTGRES_DSN": "postgresql://u@db/x"})
    assert plain.postgres_conninfo() == "postgresql://u@db/x"
    assert Settings.from_env({}).postgres_conninfo() == ""
    bad = Settings.from_env({"COMMPIPE_POSTGRES_DSN": "host=db password=hunter2 nonsense",
                             "COMMPIPE_POSTGRES_SSLMODE": "require"})
    with pytest.raises(ConfigError) as caught:
        bad.postgres_conninfo()
    assert "hunter2" not in str(caught.value)


def test_shim_batch_limits_are_what_the_worker_accepts() -> None:
    """A record the shim may send must be one the worker's decoder accepts: larger ones were
    counted as sent by the shim, then dead-lettered whole by the worker."""
    from pipeline.wire.decode import MAX_BATCH_EVENTS, MAX_RECORD_BYTES

    ok = Settings.from_env({"COMMPIPE_SHIM_BATCH_BYTES": str(MAX_RECORD_BYTES),
                            "COMMPIPE_SHIM_BATCH_EVENTS": str(MAX_BATCH_EVENTS)})
    assert (ok.shim_batch_bytes, ok.shim_batch_events) == (MAX_RECORD_BYTES, MAX_BATCH_EVENTS)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"COMMPIPE_SHIM_BATCH_BYTES": str(MAX_RECORD_BYTES + 1)})
    assert str(info.value) == (
        f"COMMPIPE_SHIM_BATCH_BYTES must be at most {MAX_RECORD_BYTES} (the largest record "
        f"the worker accepts), got {MAX_RECORD_BYTES + 1}")
    with pytest.raises(ConfigError) as info:
        Settings.from_env({}, shim_batch_events=MAX_BATCH_EVENTS + 1)
    assert str(info.value) == (
        f"COMMPIPE_SHIM_BATCH_EVENTS must be at most {MAX_BATCH_EVENTS} (the most events "
        f"of one record the worker accepts), got {MAX_BATCH_EVENTS + 1}")


def test_the_worker_limits_in_settings_are_the_decoders() -> None:
    from pipeline.settings import WORKER_BATCH_EVENTS, WORKER_RECORD_BYTES
    from pipeline.wire.decode import MAX_BATCH_EVENTS, MAX_RECORD_BYTES

    assert (WORKER_RECORD_BYTES, WORKER_BATCH_EVENTS) == (MAX_RECORD_BYTES, MAX_BATCH_EVENTS)


def test_every_commpipe_variable_the_code_reads_is_known() -> None:
    # CI runs with COMMPIPE_TEST_BROKER set: a worker warning about it printed a second
    # line where the CLI tests expect one.
    import re
    from pathlib import Path

    from pipeline.settings import unknown_variables

    root = Path(__file__).resolve().parents[2]
    used = set()
    for path in [*root.glob("pipeline/**/*.py"), *root.glob("agents/*.py"),
                 *root.glob("bench/*.py"), *root.glob("tests/**/*.py"), root / ".ci/run"]:
        if path.name != "test_settings.py":  # it holds misspelt names on purpose
            used |= set(re.findall(r"COMMPIPE_[A-Z][A-Z0-9_]*[A-Z0-9]", path.read_text()))
    used -= {"COMMPIPE_WINDOWS_S"}  # test_cli_errors misspells it on purpose
    assert unknown_variables(dict.fromkeys(used, "1")) == []
