"""Adapters from the libraries services already use to commpipe events.

Each lives in its own module so that importing one never imports the other
library: :mod:`pipeline.shim.adapters.tenacity` (retry events from ``before_sleep``)
and :mod:`pipeline.shim.adapters.pybreaker` (circuit events from a breaker listener).
"""

__all__: list[str] = []
