"""A forked render's per-edge work shared with helper processes, one run of edges each.

At 10,000 edges the render is most of a second of Python, nearly all of it per edge:
finding each edge's closed window, its quantiles and objectives (:meth:`EdgeExporter.rows`),
and formatting its lines. The forked render (:mod:`pipeline.export.exposition`) forks
helpers from itself, so each is a copy of the same snapshot; the live edges, sorted, are
cut into consecutive runs, one per process. Each makes its run's rows, and tells the first
process their series; that one admits edges under the series cap over all of them (the
cap's order is global) and tells each helper which of its edges are reported; then every
process formats its own, and the first writes each family's head followed by that
family's lines from every run, in order. The text is the same as one process writes.

A helper writes its text to a file of its own in memory (``memfd``), never waiting for the
first process to read it, and tells it through a pipe, in frames (kind, size, payload):
``S`` its rows' series and the retired totals they no longer need, ``F`` where a family's
text ends in the file, ``X`` a traceback. (Through a pipe, the text itself would hold the
helper to the first process's pace: a pipe holds 64 KB.) A helper that fails, or outlives
the deadline, fails the render; when the first process ends, a helper still running finds
its pipes closed and exits.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import struct
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pipeline.export.edges import Edge, EdgeExporter, Outcome, Plan, Snapshot

__all__ = ["MIN_EDGES", "own_session", "render", "write_all"]

MIN_EDGES = 2_000
"""Below this many live edges one process renders (a fork costs more than it saves)."""
_FRAME = struct.Struct("!cI")
_OFFSET = struct.Struct("!Q")


class PartFailed(RuntimeError):
    """A helper failed, ended without its answer, or did not answer in time."""


def render(edges: EdgeExporter, snap: Snapshot, *, processes: int, deadline: float,
           close: Iterable[int] = ()) -> tuple[Iterator[Any], Outcome]:
    """:meth:`EdgeExporter.render_pieces` of ``snap`` over up to ``processes`` processes
    (this one and forked helpers). ``deadline``: ``time.monotonic()`` past which a helper's
    answer is given up; ``close``: descriptors a helper must not keep open (the pipe this
    process answers through: its reader waits for every writer to end)."""
    if processes < 2:
        return edges.render_pieces(snap)
    plan = edges.plan(snap)
    order = sorted(plan.live)
    count = min(processes, len(order) // MIN_EDGES)
    if count < 2:
        return edges.pieces_of(plan)
    bounds = [len(order) * i // count for i in range(count + 1)]
    runs = [order[bounds[i]:bounds[i + 1]] for i in range(count)]
    helpers: list[_Helper] = []
    try:
        for run in runs[1:]:  # each closes what it inherits of the helpers before it
            helpers.append(_Helper(edges, plan, run, deadline, [
                *close, *(fd for h in helpers for fd in (h.up, h.down, h.text))]))
        rows, forget = edges.rows(plan, runs[0])
        sizes = dict(zip(runs[0], (r.size for r in rows), strict=True))
        for helper in helpers:
            theirs, found = helper.sizes()
            sizes.update(zip(helper.run, theirs, strict=True))
            forget += found
        reported, outcome = edges.admit(plan, sizes, forget)
        everyone = len(reported) == len(order)
        chosen = set(reported)
        for helper in helpers:
            helper.choose(None if everyone else
                          [i for i, edge in enumerate(helper.run) if edge in chosen])
        mine = rows if everyone else [r for e, r in zip(runs[0], rows, strict=True)
                                      if e in chosen]
        parts = [edges.text.chunks(mine), *(helper.families() for helper in helpers)]
        return _reaped(edges.assemble(parts, len(reported), plan, outcome), helpers), outcome
    except BaseException:
        for helper in helpers:
            helper.end()
        raise


def _reaped(pieces: Iterator[str | bytes], helpers: Sequence[_Helper]
            ) -> Iterator[str | bytes]:
    try:
        yield from pieces
    finally:
        for helper in helpers:
            helper.end()


class _Helper:
    """One forked helper, making the rows and lines of ``run``."""

    def __init__(self, edges: EdgeExporter, plan: Plan, run: list[Edge], deadline: float,
                 close: Iterable[int]) -> None:
        self.run = run
        self.deadline = deadline
        self.text = _memory_file()
        self.read_to = 0
        up_r, up_w = os.pipe()
        down_r, down_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the helper: never returns
            for fd in (up_r, down_w, *close):
                with contextlib.suppress(OSError):
                    os.close(fd)
            _help(edges, plan, run, up_w, down_r, self.text)
        os.close(up_w)
        os.close(down_r)
        self.pid, self.up, self.down = pid, up_r, down_w

    def sizes(self) -> tuple[list[int], list[Any]]:
        sizes, forget = pickle.loads(self._expect(b"S"))  # noqa: S301 - our own helper's
        return sizes, forget

    def choose(self, indices: list[int] | None) -> None:
        """Tell the helper which of its run are reported (None: all)."""
        _send(self.down, b"R", pickle.dumps(indices, pickle.HIGHEST_PROTOCOL))

    def families(self) -> Iterator[Iterator[bytes]]:
        while True:
            yield self._family()

    def _family(self) -> Iterator[bytes]:
        end, = _OFFSET.unpack(self._expect(b"F"))
        while self.read_to < end:
            piece = os.pread(self.text, min(1 << 20, end - self.read_to), self.read_to)
            if not piece:
                raise PartFailed("a render helper's text ended short of what it said")
            self.read_to += len(piece)
            yield piece

    def end(self) -> None:
        """Close the pipes and reap the helper (killed if still running)."""
        for fd in (self.up, self.down, self.text):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)

    def _expect(self, kind: bytes) -> bytearray:
        got, data = self._frame()
        if got != kind:
            raise PartFailed(f"a render helper answered {got!r} where {kind!r} was due")
        return data

    def _frame(self) -> tuple[bytes, bytearray]:
        kind, size = _FRAME.unpack(self._read(_FRAME.size))
        data = self._read(size)
        if kind == b"X":
            raise PartFailed("a render helper failed: " + data.decode(errors="replace")
                             .strip().rsplit("\n", 1)[-1])
        return kind, data

    def _read(self, size: int) -> bytearray:
        """Exactly ``size`` bytes (a frame never reads into the next)."""
        data = bytearray(size)
        view, got = memoryview(data), 0
        while got < size:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.up], [], [], left)[0]:
                raise PartFailed("a render helper took longer than the render's timeout")
            n = os.readv(self.up, [view[got:]])
            if not n:
                raise PartFailed("a render helper ended without its answer")
            got += n
        return data


def own_session() -> None:
    """Start a session of its own: where the kernel shares CPU between sessions first
    (Linux's autogroup, on by default outside cgroups), a render in the worker's session
    took its CPU from the worker's share, and ran at a third of a core beside the stream
    and a helper. Its own session is one more group, with a share of its own. Signals to
    the worker's process group (a terminal's Ctrl-C) no longer reach it: the worker's
    timeout kills it by pid."""
    with contextlib.suppress(OSError):  # already a session leader
        os.setsid()


def _help(edges: EdgeExporter, plan: Plan, run: list[Edge], up: int, down: int,
          text: int) -> None:
    """The helper's work (see the module docstring); exits, whatever happens."""
    code = 1
    try:
        own_session()
        rows, forget = edges.rows(plan, run)
        _send(up, b"S", pickle.dumps(([r.size for r in rows], forget),
                                     pickle.HIGHEST_PROTOCOL))
        indices = pickle.loads(_receive(down))  # noqa: S301 - from the process that forked us
        if indices is not None:
            rows = [rows[i] for i in indices]
        end = 0
        for family in edges.text.chunks(rows):
            for piece in family:
                end += write_all(text, piece.encode())
            _send(up, b"F", _OFFSET.pack(end))
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the pipe, never raised here
        with contextlib.suppress(BaseException):
            _send(up, b"X", traceback.format_exc(limit=8).encode())
    finally:
        os._exit(code)


def _send(fd: int, kind: bytes, data: bytes) -> None:
    write_all(fd, _FRAME.pack(kind, len(data)) + data)


def write_all(fd: int, data: bytes) -> int:
    """Write all of ``data`` to ``fd`` (a pipe takes what it has room for); its size."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def _memory_file() -> int:
    """A descriptor of an anonymous file (in memory where the system has ``memfd``)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("commpipe-render-part")
    return os.dup(tempfile.TemporaryFile().fileno())  # noqa: SIM115 - closed by its dup's end


def _receive(fd: int) -> bytes:
    """One frame's payload from ``fd`` (blocking: the first process answers, or its end
    closes the pipe)."""
    data = b""
    while len(data) < _FRAME.size or len(data) < _FRAME.size + _FRAME.unpack_from(data)[1]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise EOFError("the render ended before telling which edges are reported")
        data += chunk
    return data[_FRAME.size:]
