"""Headless Chromium (Debian's ``chromium``) for tests: the DOM after a page has run, and a
screenshot. Each run gets a fresh profile directory and its own process group, which is
killed at the end whatever happens."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--hide-scrollbars", "--mute-audio"]


def chromium() -> str:
    """The browser's path; a failure (never a skip) when it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("headless Chromium is needed: apt-get install -y chromium (.ci/run does)")
    return found


def run(page: Path, *args: str, window: tuple[int, int] = (1400, 1100),
        timeout: float = 90.0) -> str:
    """Run Chromium on ``page`` with ``args``; its standard output."""
    with tempfile.TemporaryDirectory(prefix="commpipe-chromium-") as profile:
        proc = subprocess.Popen(
            [chromium(), *FLAGS, f"--user-data-dir={profile}",
             f"--window-size={window[0]},{window[1]}", *args, page.resolve().as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            try:  # the browser's helpers (renderer, zygote) are in its process group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        assert proc.returncode == 0, err[-3000:]
        return out


def dump_dom(page: Path, **kw: object) -> str:
    """The page's DOM once it has loaded and its scripts have run."""
    return run(page, "--dump-dom", **kw)  # type: ignore[arg-type]


def screenshot(page: Path, png: Path, **kw: object) -> Path:
    run(page, f"--screenshot={png}", **kw)  # type: ignore[arg-type]
    assert png.exists() and png.stat().st_size > 0
    return png
