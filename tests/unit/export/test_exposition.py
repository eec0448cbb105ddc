"""``/metrics`` rendered in a forked copy of the process: the same text as a render in the
loop, the series cap's state carried back, gzip, and a child that fails, hangs or gets a
signal (the loop runs in the main thread here, as in the worker)."""

from __future__ import annotations

import asyncio
import gzip
import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pipeline.core.rollups import Rollups
from pipeline.export.edges import EdgeExporter, Outcome
from pipeline.export.exposition import _TAIL, Exposition, RenderFailed, _parse
from tests.unit.export.test_collectors import (
    BARE_EDGE_SERIES,
    CFG,
    T0,
    A,
    B,
    ev,
    feed,
    lab,
    parse,
)


def exposition(store: dict[str, Any], *, fork: bool, **kw: Any) -> Exposition:
    edges = EdgeExporter(Rollups(store, CFG, idle_close_s=1e9), clock=lambda: T0 + 100.0,
                         **kw)
    return Exposition(edges, CollectorRegistry(auto_describe=False), fork=fork,
                      timeout_s=kw.pop("timeout_s", 10.0))


def scrapes(ex: Exposition, n: int = 1, *, gzipped: bool = False,
            during: Any = None) -> list[bytes | BaseException]:
    """``n`` scrapes from a thread while the loop runs in this (the main) thread."""

    async def main() -> list[bytes | BaseException]:
        loop = asyncio.get_running_loop()
        out: list[bytes | BaseException] = []
        for _ in range(n):
            job = loop.run_in_executor(None, lambda: ex.scrape_from_thread(
                loop, gzipped=gzipped))
            if during is not None:
                await during(loop)
            try:
                out.append(await job)
            except RenderFailed as e:
                out.append(e)
        return out

    return asyncio.run(main())


def store_of_two_edges() -> dict[str, Any]:
    store: dict[str, Any] = {}
    feed(store, 0, 1, [ev(A, "request", T0 + 1, 1), ev(A, "response", T0 + 2, 2,
                                                          latency_ms=30.0),
                       ev(A, "request", T0 + 30, 3)], now=100.0)
    feed(store, 1, 1, [ev(B, "error", T0 + 1, 4, error_type="reset", latency_ms=700.0)],
         now=90.0)
    return store


def edge_part(body: bytes) -> dict[Any, float]:
    return {k: v for k, v in parse(body.decode()).items()
            if k[0] != "commpipe_exporter_scrape_seconds"}


FORKED: list[int] = []


@pytest.fixture(autouse=True)
def forks_recorded(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Each child's pid, so that a test can tell it was reaped (other children of this
    process, the session's broker and database, are not its business)."""
    fork = os.fork

    def recorded() -> int:
        pid = fork()
        if pid:
            FORKED.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recorded)
    FORKED.clear()
    yield


def no_children_left() -> bool:
    """Every child the test forked has exited and was reaped."""
    for pid in FORKED:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        return False
    return bool(FORKED)


def test_a_forked_render_gives_the_loops_text_and_gzips_when_asked() -> None:
    store = store_of_two_edges()
    here, = scrapes(exposition(store, fork=False))
    forked, zipped = scrapes(exposition(store, fork=True), 2, gzipped=True)
    assert isinstance(here, bytes) and isinstance(forked, bytes) and isinstance(zipped, bytes)
    assert edge_part(gzip.decompress(forked)) == edge_part(here)
    got = edge_part(gzip.decompress(zipped))
    assert got[("commpipe_communication_requests_total", lab(A))] == 2
    assert got[("commpipe_communication_errors_total", lab(B, error_type="reset"))] == 1
    assert no_children_left()


def test_the_caps_refusals_come_back_from_the_child_and_are_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    ex = exposition(store_of_two_edges(), fork=True, max_series=BARE_EDGE_SERIES + 20)
    first, second = scrapes(ex, 2)
    assert isinstance(first, bytes) and isinstance(second, bytes)
    for body in (first, second):
        got = parse(body.decode())
        assert got[("commpipe_exporter_edges", ())] == 1
        assert got[("commpipe_exporter_edges_refused_total", ())] == 1
        # the newest edge (A, seen at 100 s) keeps its place; B (90 s) is refused
        assert ("commpipe_communication_requests_total", lab(A)) in got
    assert ex.edges.refusals == 1
    assert ex.edges._admitted == {A}  # noqa: SLF001 - carried back from the child
    assert [r.getMessage() for r in caplog.records if "left out" in r.message] == [
        f"exporter: edge api -> db (grpc) left out of /metrics: its {BARE_EDGE_SERIES + 1} "
        f"series would pass COMMPIPE_METRICS_MAX_SERIES={BARE_EDGE_SERIES + 20}"]
    cost = parse(second.decode())
    assert cost[("commpipe_exporter_scrape_seconds", (("part", "render"),))] > 0


def test_a_failing_render_answers_with_its_error_and_leaves_no_child(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ex = exposition(store_of_two_edges(), fork=True)

    def broken(snapshot: Any) -> Any:
        raise KeyError("no such window")

    monkeypatch.setattr(ex.edges, "render_pieces", broken)
    failed, = scrapes(ex)
    assert isinstance(failed, RenderFailed)
    assert str(failed) == "the render failed: KeyError: 'no such window'"
    assert no_children_left()


def test_a_render_past_its_timeout_is_killed(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    ex = exposition(store_of_two_edges(), fork=True)
    ex.timeout_s = 1.0
    pids = tmp_path / "pid"

    def hangs(snapshot: Any) -> Any:
        pids.write_text(str(os.getpid()))
        time.sleep(60)

    monkeypatch.setattr(ex.edges, "render_pieces", hangs)
    began = time.monotonic()
    failed, = scrapes(ex)
    assert isinstance(failed, RenderFailed)
    assert str(failed) == "the render took longer than its timeout"
    assert time.monotonic() - began < 10
    assert no_children_left()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pids.read_text()), 0)


def test_a_signal_to_the_child_never_reaches_the_workers_loop(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The child shares the loop's wake-up pipe: with the loop's handlers left in place, a
    SIGTERM to the child would stop the worker."""
    ex = exposition(store_of_two_edges(), fork=True)
    pids = tmp_path / "pid"
    render = ex.edges.render_pieces

    def slow(snapshot: Any) -> Any:
        pids.write_text(str(os.getpid()))
        time.sleep(2)
        return render(snapshot)

    monkeypatch.setattr(ex.edges, "render_pieces", slow)
    stopped: list[int] = []

    async def terminate_the_child(loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, stopped.append, 1)
        try:
            while not (pids.exists() and pids.read_text()):  # written whole, not begun
                await asyncio.sleep(0.01)
            os.kill(int(pids.read_text()), signal.SIGTERM)
            await asyncio.sleep(0.5)  # a wake-up byte would be handled by now
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    failed, = scrapes(ex, during=terminate_the_child)
    assert isinstance(failed, RenderFailed)
    assert str(failed) == "the render ended without an answer"
    assert stopped == []
    assert no_children_left()


def test_a_fork_that_fails_renders_in_the_loop(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    store = store_of_two_edges()
    here, = scrapes(exposition(store, fork=False))

    def no_memory() -> int:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(os, "fork", no_memory)
    served, = scrapes(exposition(store, fork=True))
    assert isinstance(here, bytes) and isinstance(served, bytes)
    assert edge_part(served) == edge_part(here)
    assert [r.getMessage() for r in caplog.records if "could not fork" in r.message] == [
        "metrics: could not fork the render ([Errno 12] Cannot allocate memory); rendering "
        "in the event loop, which the stream waits for"]


def test_an_answer_cut_off_is_no_answer() -> None:
    """A child that died while writing (the OOM killer, say) leaves part of a body and no
    trailer; a cut that happens to end like one is no answer either."""
    outcome = Outcome(None, set(), [], [], 0)
    done = pickle.dumps((outcome, 0.5))
    whole = b"# some text\n" + done + _TAIL.pack(len(done), b"K", b"end")
    assert _parse(whole)[1:] == (b"# some text\n", 0.5)
    for cut in (whole[:5], whole[:12], whole[:-1], b""):
        with pytest.raises(RenderFailed, match="ended without an answer"):
            _parse(cut)
    fake = b"metric 1\n" + _TAIL.pack(4, b"K", b"end")  # 4 bytes of text, not a pickle
    with pytest.raises(RenderFailed, match="ended without an answer"):
        _parse(fake)


def test_the_render_runs_in_a_session_of_its_own(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """Where the kernel shares CPU between sessions first, a render in the worker's session
    would run on the worker's own share."""
    ex = exposition(store_of_two_edges(), fork=True)
    render = ex.edges.render_pieces
    seen = tmp_path / "session"

    def recording(snapshot: Any) -> Any:
        seen.write_text(f"{os.getsid(0)} {os.getpid()}")
        return render(snapshot)

    monkeypatch.setattr(ex.edges, "render_pieces", recording)
    body, = scrapes(ex)
    assert isinstance(body, bytes) and b"commpipe_exporter_edges 2\n" in body
    session, pid = map(int, seen.read_text().split())
    assert session == pid != os.getsid(0)
    assert no_children_left()
