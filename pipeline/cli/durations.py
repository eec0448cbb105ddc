"""Lookbacks as people type them: ``90s``, ``30m``, ``1h``, ``2d``."""

from __future__ import annotations

import math
import re
from typing import Final

from pipeline.errors import ConfigError

__all__ = ["parse_duration"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT_S: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d`` or plain seconds, as seconds (> 0)."""
    m = _DURATION.fullmatch(text.strip().lower())
    seconds = float(m[1]) * _UNIT_S[m[2]] if m else 0.0
    if not m or not 0 < seconds < math.inf:
        raise ConfigError(f"{text!r} is not a duration: use e.g. 90s, 30m, 1h or 2d")
    return seconds
