# The commpipe worker for docker-compose: `docker compose up worker`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY agents agents
COPY sql sql
RUN pip install --no-cache-dir '.[server]'
EXPOSE 9464
CMD ["commpipe", "worker"]
