"""The worker's HTTP server: ``/metrics`` and ``/health``, served off the event loop.

A scrape at 10,000 edges is megabytes of text. Served by the event loop (Faust's own web
server), each part of it waited for the loop between two batches, and the transfer took
many such turns; while the text was built, the loop stood still. Here a small threaded
HTTP server answers instead: the loop only forks a copy of the worker that renders (and
gzips, when asked) the body (:meth:`Exposition.scrape_from_thread`); the request's thread
waits for it and sends it.

Only ``/metrics``, ``/health`` (200 ``ok`` while the worker runs) and the pages in
:attr:`MetricsServer.routes` are served; Faust's own pages (``/table/...`` shows table
contents, ``/router/...``) are not.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.export.exposition import CONTENT_TYPE, Exposition

__all__ = ["MetricsServer"]

log = logging.getLogger("commpipe.metrics")


class MetricsServer:
    """``start(loop)`` binds ``host:port`` and serves in a daemon thread; ``stop()``."""

    def __init__(self, exposition: Exposition, host: str, port: int) -> None:
        self.exposition = exposition
        self.host, self.port = host, port
        self.routes: dict[str, Callable[[], tuple[bytes, str]]] = {}
        """Extra pages: path -> a function returning (body, content type), run in the
        request's thread."""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
                try:
                    if path == "/metrics":  # compressed by the render when asked
                        body = server.exposition.scrape_from_thread(loop, gzipped=gzipped)
                        kind = CONTENT_TYPE
                    elif path == "/health":
                        body, kind = b"ok\n", "text/plain; charset=utf-8"
                    elif path in server.routes:
                        body, kind = server.routes[path]()
                    else:
                        self.send_error(404, "only /metrics and /health are served here")
                        return
                except Exception as e:  # noqa: BLE001 - a scrape must never stop the worker
                    log.error("metrics: %s failed (%s: %s)", path, type(e).__name__, e)
                    self.send_error(503, "the worker could not answer now")
                    return
                if gzipped and path != "/metrics":
                    body = gzip.compress(body, compresslevel=1)
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                if gzipped:
                    self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # one line per scrape is noise

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="commpipe-metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.exposition.close()
