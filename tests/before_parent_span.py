"""The commpipe of before ``parent_span_id``: its source tree, unpacked from the repository's
history, to show that a v1 reader deployed today ignores the new field.

:data:`BEFORE` is the last commit of main without the field. :func:`tree_before` unpacks
its ``pipeline/``, ``agents/``, ``sql/`` and ``pyproject.toml`` into a directory; a Python
started there (``cwd``) imports that ``pipeline`` rather than this checkout's. A checkout
without history cannot do this, and then the tests that need it fail saying so.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

BEFORE = "ed0c076f469823895e6861b4da341a59617794ce"
ROOT = Path(__file__).resolve().parents[1]


def tree_before(dest: Path) -> Path:
    """Unpack the tree of :data:`BEFORE` into ``dest`` (created) and return it."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", BEFORE, "pipeline", "agents", "sql",
         "pyproject.toml"], capture_output=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(
            f"cannot read commit {BEFORE} from the repository's history (a shallow clone?): "
            f"{done.stderr.decode(errors='replace').strip()}; fetch the full history")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        tar.extractall(dest, filter="data")
    events = (dest / "pipeline" / "wire" / "events.py").read_text()
    assert "parent_span_id" not in events, "BEFORE must be a commit without parent_span_id"
    return dest
