# The commpipe worker for docker-compose: `docker compose up worker`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY agents agents
COPY sql sql
# the runtime only: no embedded broker or PostgreSQL (those are '.[embedded]', for dev)
RUN pip install --no-cache-dir '.[server]'
EXPOSE 9464
# /health answers while the worker runs (pipeline/export/server.py)
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/health', timeout=4)"
CMD ["commpipe", "worker"]
