"""The one root error of commpipe and its direct children.

Every error says what was wrong and what to do about it. Driver errors are
wrapped with ``raise ... from e`` so the cause stays visible without leaking
configuration values (DSNs, passwords) into the message.
"""

from __future__ import annotations

__all__ = ["CommpipeError", "ConfigError", "EventValidationError", "ServiceError"]


class CommpipeError(Exception):
    """Root of every error commpipe raises on purpose."""


class ConfigError(CommpipeError):
    """A setting is missing or has a value commpipe cannot use."""


class ServiceError(CommpipeError):
    """An external service (broker, database) could not be started or reached."""


class EventValidationError(CommpipeError, ValueError):
    """An event (or a whole record) does not follow wire format v1.

    ``field`` names the offending field (``None`` for record-level problems such
    as invalid JSON), ``reason`` says what is wrong with it, and ``index`` is the
    event's position inside a batch record (``None`` for a single-event record).
    """

    def __init__(self, field: str | None, reason: str, *, index: int | None = None) -> None:
        self.field = field
        self.reason = reason
        self.index = index
        where = f"event[{index}]" if index is not None else ""
        if field:
            where = f"{where}.{field}" if where else field
        super().__init__(f"{where}: {reason}" if where else reason)
