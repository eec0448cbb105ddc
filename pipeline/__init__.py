"""commpipe: telemetry for the communication between services.

The root exports what a service needs to emit events and what any consumer
needs to read them. Importing it loads the shim's dependencies only (aiokafka,
orjson): Faust, database drivers and the CLI live behind their own modules.
"""

from pipeline.decode import DecodedRecord, decode_event, decode_record, validate_event
from pipeline.errors import CommpipeError, ConfigError, EventValidationError, ServiceError
from pipeline.events import Event, edge_key
from pipeline.settings import Settings
from pipeline.shim import AsyncEmitter, Call, Emitter, EmitterStats

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
