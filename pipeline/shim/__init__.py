"""The producer shim services import: emitters, the call timer, the bounded outbox.

Light on purpose: it needs aiokafka and orjson only. The Prometheus collector
for an emitter's counts (:mod:`pipeline.shim.metrics`) and the adapters
(:mod:`pipeline.shim.adapters`) load their libraries only when imported.
"""

from pipeline.shim.call import Call
from pipeline.shim.emitter import AsyncEmitter, Emitter
from pipeline.shim.outbox import EmitterStats

__all__ = ["AsyncEmitter", "Call", "Emitter", "EmitterStats"]
