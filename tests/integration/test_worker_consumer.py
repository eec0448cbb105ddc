"""The worker's consumer against the real broker: a setting that works by reaching into
aiokafka's objects (agents/private.py) must reach what the fetches use."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.app import create_app
from pipeline.settings import Settings


def test_the_fetch_wait_setting_reaches_the_fetcher_of_the_consumer_faust_builds(
        kafka_bootstrap: str) -> None:
    """COMMPIPE_WORKER_FETCH_WAIT_MS is set on the consumer Faust builds (it fixes 1,500 ms);
    started, the consumer's fetcher must wait what the setting says."""
    settings = Settings.from_env({}, kafka_bootstrap=kafka_bootstrap, metrics_port=0,
                                 duckdb_path="", worker_fetch_wait_ms=123)
    pipeline = create_app(settings)

    async def fetcher_wait() -> Any:
        consumer = pipeline.app.consumer._thread._create_worker_consumer(  # noqa: SLF001
            pipeline.app.transport)
        await consumer.start()
        try:
            return consumer._fetcher._fetch_max_wait_ms  # noqa: SLF001 - what fetches use
        finally:
            await consumer.stop()

    assert asyncio.run(fetcher_wait()) == 123
