"""Wire format v1, shared by the shim and the worker: the event, its one validating
decoder, the record headers that number a producer's records, and the masking of
credentials in error messages. Imports nothing of commpipe but its errors."""

from pipeline.wire.decode import DecodedRecord, decode_event, decode_record, validate_event
from pipeline.wire.events import SCHEMA_VERSION, Event, edge_key, split_edge_key
from pipeline.wire.headers import PRODUCER_HEADER, SEQ_HEADER

__all__ = ["PRODUCER_HEADER", "SCHEMA_VERSION", "SEQ_HEADER", "DecodedRecord", "Event",
           "decode_event", "decode_record", "edge_key", "split_edge_key", "validate_event"]
