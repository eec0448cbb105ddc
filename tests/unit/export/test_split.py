"""The render shared over helper processes: the same text and outcome as one process
writes (edges spread over partitions, reported circuits, error types, the series cap
refusing edges of every run), each family in pieces, and helpers that fail or hang."""

from __future__ import annotations

import gzip
import os
import random
import time
from typing import Any

import pytest

from pipeline.core.rollups import Rollups
from pipeline.export import split
from pipeline.export.edges import EdgeExporter, Outcome
from pipeline.export.exposition import _encoded
from tests.unit.export.test_collectors import CFG, T0, ev, feed, parse

EDGES = 60


def many_edges() -> dict[str, Any]:
    """``EDGES`` edges over three partitions (every fifth on all three, as a non-shim
    producer spreads one), seen at different times, some failing, some reporting a
    circuit, some only in an older window."""
    rng = random.Random(25)
    store: dict[str, Any] = {}
    n = 0
    for partition in range(3):
        events = []
        for i in range(EDGES):
            if i % 5 and i % 3 != partition:
                continue
            edge = (f"svc{i % 7}", f"dep{i}", "http" if i % 2 else "grpc")
            start = T0 + (0 if i % 11 == 0 else 10)  # some only in the older window
            for k in range(rng.randint(1, 6)):
                n += 1
                kind = rng.choice(["response", "response", "error", "timeout", "retry"])
                opt: dict[str, Any] = {"latency_ms": rng.uniform(1, 900)}
                if kind == "error":
                    opt["error_type"] = rng.choice(["reset", 'quote"d', "5xx"])
                if kind == "retry":
                    opt = {"backoff_ms": 50.0}
                events.append(ev(edge, kind, start + k, n, **opt))
            if i % 4 == 0:
                n += 1
                events.append(ev(edge, "circuit", start + 8, n,
                                 circuit_state=rng.choice(["open", "half_open", "closed"])))
        n += 1
        events.append(ev(("clock", "tick", "http"), "request", T0 + 30, n))
        feed(store, partition, 1, events, now=100.0 - partition)
    return store


def exporter(store: dict[str, Any], **kw: Any) -> EdgeExporter:
    return EdgeExporter(Rollups(store, CFG, idle_close_s=1e9), clock=lambda: T0 + 100.0,
                        **kw)


def split_render(ex: EdgeExporter, processes: int, deadline_s: float = 30.0
                 ) -> tuple[bytes, Outcome]:
    pieces, outcome = split.render(ex, ex.snapshot(), processes=processes,
                                   deadline=time.monotonic() + deadline_s)
    return b"".join(map(_encoded, pieces)), outcome


@pytest.fixture
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split, "MIN_EDGES", 5)


@pytest.mark.parametrize("processes", [2, 3, 7])
def test_shared_render_writes_one_process_text(small_runs: None, processes: int) -> None:
    store = many_edges()
    alone, alone_outcome = exporter(store).render(exporter(store).snapshot())
    shared, outcome = split_render(exporter(store), processes)
    assert shared == alone
    assert outcome == alone_outcome
    got = parse(shared.decode())
    assert got[("commpipe_exporter_edges", ())] == EDGES + 1
    # every family is there, with its head once
    assert shared.count(b"# TYPE commpipe_communication_circuit_state gauge") == 1
    assert sum(1 for k in got if k[0] == "commpipe_communication_errors_total") > 3


def test_the_cap_refuses_the_same_edges_whichever_run_holds_them(small_runs: None) -> None:
    store = many_edges()
    ex = exporter(store)
    full = parse(ex.scrape().decode())[("commpipe_exporter_series", ())]
    cap = int(full * 0.6)
    alone, alone_outcome = exporter(store, max_series=cap).render(ex.snapshot())
    shared, outcome = split_render(exporter(store, max_series=cap), 3)
    assert shared == alone
    assert outcome == alone_outcome
    refused = sorted(outcome.refused)
    assert len(refused) > EDGES // 4
    order = sorted(outcome.admitted | outcome.refused)  # type: ignore[operator]
    thirds = [order[:len(order) // 3], order[len(order) // 3:2 * len(order) // 3],
              order[2 * len(order) // 3:]]
    assert all(set(third) & outcome.refused for third in thirds)


def test_below_the_run_size_one_process_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    forked: list[int] = []
    fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forked.append(1) or fork())
    store = many_edges()
    shared, _ = split_render(exporter(store), 4)  # 61 edges < 2 x 2,000
    assert shared == exporter(store).render(exporter(store).snapshot())[0]
    assert forked == []


def test_text_in_pieces_is_the_text_whole() -> None:
    ex = exporter(many_edges())
    plan = ex.plan(ex.snapshot())
    rows, _ = ex.rows(plan, sorted(plan.live))
    whole = ex.text.families(rows)
    for size in (1, 2, 7, 1024):
        pieces = [list(family) for family in ex.text.chunks(rows, size)]
        assert ["".join(p) for p in pieces] == whole
        assert len(pieces[0]) == -(-len(rows) // size)  # requests_total: a line per edge
    assert [list(family) for family in ex.text.chunks([], 3)] == [[]] * len(whole)


def helpers_only(monkeypatch: pytest.MonkeyPatch, action: Any) -> None:
    """``action`` runs in place of :meth:`EdgeExporter.rows` in helpers, not here."""
    here = os.getpid()
    rows = EdgeExporter.rows

    def patched(self: EdgeExporter, *args: Any) -> Any:
        if os.getpid() != here:
            action()
        return rows(self, *args)

    monkeypatch.setattr(EdgeExporter, "rows", patched)


def test_a_failing_helper_fails_the_render(small_runs: None, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Any) -> None:
    pids = tmp_path / "pids"

    def fail() -> None:
        with pids.open("a") as f:
            f.write(f"{os.getpid()}\n")
        raise KeyError("no such window")

    helpers_only(monkeypatch, fail)
    with pytest.raises(split.PartFailed, match=r"^a render helper failed: KeyError: "
                                               r"'no such window'$"):
        split_render(exporter(many_edges()), 3)
    assert gone(pids)


def gone(pids: Any) -> bool:
    """Every helper that wrote its pid in ``pids`` has exited and was reaped."""
    found = list(map(int, pids.read_text().split()))
    for pid in found:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return bool(found)


def test_a_helper_past_the_deadline_is_given_up_and_killed(
        small_runs: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    pids = tmp_path / "pids"

    def hang() -> None:
        with pids.open("a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(60)

    helpers_only(monkeypatch, hang)
    began = time.monotonic()
    with pytest.raises(split.PartFailed, match="took longer than the render's timeout"):
        split_render(exporter(many_edges()), 2, deadline_s=1.0)
    assert time.monotonic() - began < 10
    assert len(pids.read_text().split()) == 1
    assert gone(pids)


def test_a_scrape_shares_its_render_and_gives_the_loops_text(small_runs: None) -> None:
    from tests.unit.export.test_exposition import edge_part, exposition, scrapes

    store = many_edges()
    here, = scrapes(exposition(store, fork=False))
    shared = exposition(store, fork=True)
    shared.processes = 3
    body, = scrapes(shared, gzipped=True)
    assert isinstance(here, bytes) and isinstance(body, bytes)
    assert edge_part(gzip.decompress(body)) == edge_part(here)
    assert edge_part(here)[("commpipe_exporter_edges", ())] == EDGES + 1
