"""Integration tests: real broker and database from the session fixtures in ``tests/conftest.py``.

Every test collected under this directory gets the ``integration`` marker, so
``pytest -m "not integration"`` stays service-free even if a module forgets
its ``pytestmark``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in ``tests/integration`` as ``integration``."""
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
