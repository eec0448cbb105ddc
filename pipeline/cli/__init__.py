"""The command line ``commpipe``: verbs that wire the library's parts together.

Nothing imports this package but the console script and ``python -m pipeline.cli``.
"""

from pipeline.cli.main import main

__all__ = ["main"]
