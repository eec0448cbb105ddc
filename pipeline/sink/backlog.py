"""What the worker holds for a database that has not stored it yet, and its bound.

Closed windows and kept events stay in the worker's table until every database has
them, so a database that is away makes the table, and the worker's memory, grow with
the traffic. :class:`BacklogLimit` bounds it (``COMMPIPE_SINK_MAX_BACKLOG`` closed
windows plus kept events, 250,000 by default) and says what happens past the bound
(``COMMPIPE_SINK_BACKLOG_POLICY``):

- ``pause`` (default): the worker stops reading its input partitions
  (:meth:`Backlog.holding` is what it asks after each round) until the backlog is down
  to half the bound. Nothing is lost: the records wait in Kafka (as long as the topic's
  retention keeps them) and ``/metrics`` stops moving meanwhile; consumer lag grows.
- ``drop``: the worker keeps reading; for a database that is failing, the sink gives up
  its copy of the oldest windows the watermark has closed for good and the oldest kept
  events, down to half the bound, so they leave the table without it. That database's
  history has a gap, counted (``dropped_windows``, ``dropped_events`` of its
  :class:`~pipeline.sink.writer.TargetStatus``, ``<ns>_sink_dropped_total``) and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

__all__ = ["Backlog", "BacklogLimit"]

log = logging.getLogger("commpipe.sink")


@dataclass(frozen=True, slots=True)
class BacklogLimit:
    max_items: int = 250_000
    """Closed windows plus kept events held for a database (0: no bound)."""
    policy: Literal["pause", "drop"] = "pause"

    @property
    def low_water(self) -> int:
        """Where a paused worker reads again, and down to where ``drop`` gives up."""
        return self.max_items // 2


class Backlog:
    """The last round's count of what waits for some database, and the pause decision."""

    def __init__(self, limit: BacklogLimit | None = None) -> None:
        self.limit = limit or BacklogLimit()
        self.windows = 0
        """Closed windows some database has not stored (after the last round)."""
        self.events = 0
        """Kept events some database has not stored."""
        self.paused = False
        self.pauses = 0

    @property
    def size(self) -> int:
        return self.windows + self.events

    def update(self, windows: int, events: int) -> None:
        self.windows, self.events = windows, events
        limit = self.limit
        if limit.policy != "pause" or not limit.max_items:
            return
        if not self.paused and self.size > limit.max_items:
            self.paused = True
            self.pauses += 1
            log.warning("sink: %d windows and %d kept events wait for a database (bound %d, "
                        "COMMPIPE_SINK_MAX_BACKLOG): the worker stops reading its input "
                        "until %d are left", windows, events, limit.max_items, limit.low_water)
        elif self.paused and self.size <= limit.low_water:
            self.paused = False
            log.warning("sink: the backlog is down to %d windows and %d kept events: the "
                        "worker reads its input again", windows, events)

    def holding(self) -> bool:
        """True while the worker should not read its input (``pause`` past the bound)."""
        return self.paused
