"""Services for demos and tests, started from Python wheels with no system install:
the embedded Kafka-protocol broker (:mod:`~pipeline.dev.broker`), PostgreSQL
(:mod:`~pipeline.dev.postgres`), and the process helpers they share
(:mod:`~pipeline.dev.process`). Production runs Apache Kafka and PostgreSQL."""

__all__: list[str] = []
