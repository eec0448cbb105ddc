"""commpipe: telemetry for the communication between services.

The root exports what a service needs to emit events and what any consumer
needs to read them. Importing it loads the shim's dependencies only (aiokafka,
orjson): Faust, database drivers and the CLI live behind their own modules.

The parts, in the order the data goes (each imports only the parts below it;
``errors``, ``settings`` and ``config_file`` here at the root are below them all):

- :mod:`pipeline.wire`: the event format, its one decoder, record headers, masking
- :mod:`pipeline.shim`: what services import: emitters, call timer, outbox, adapters
- :mod:`pipeline.core`: windows, sketches, circuit state, dedup, objectives (plain Python)
- :mod:`pipeline.sink`: PostgreSQL and DuckDB writers, migrations
- :mod:`pipeline.export`: the Prometheus collectors
- :mod:`pipeline.dev`: the embedded broker and PostgreSQL for demos and tests
- :mod:`pipeline.cli`: the ``commpipe`` verbs

The Faust app itself is the top-level package ``agents``.
"""

from pipeline.errors import CommpipeError, ConfigError, EventValidationError, ServiceError
from pipeline.settings import Settings
from pipeline.shim import AsyncEmitter, Call, Emitter, EmitterStats
from pipeline.wire import (
    DecodedRecord,
    Event,
    decode_event,
    decode_record,
    edge_key,
    validate_event,
)

__all__ = [
    "AsyncEmitter",
    "Call",
    "CommpipeError",
    "ConfigError",
    "DecodedRecord",
    "Emitter",
    "EmitterStats",
    "Event",
    "EventValidationError",
    "ServiceError",
    "Settings",
    "decode_event",
    "decode_record",
    "edge_key",
    "validate_event",
]
