# Image for the Pulse worker, dashboard and load generator (used by docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY dashboard ./dashboard
COPY schemas ./schemas
COPY loadgen ./loadgen
RUN pip install --no-cache-dir .
ENTRYPOINT ["pulse"]
