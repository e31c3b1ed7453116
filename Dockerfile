# syntax=docker/dockerfile:1
# lmgate: queueing reverse proxy in front of LM Studio's OpenAI-compatible API.
#
#   docker build -t lmgate .
#   docker run --rm -p 1235:1235 \
#     --add-host host.docker.internal:host-gateway \
#     -e LMGATE_UPSTREAM=http://host.docker.internal:1234 lmgate
#
# See deploy/README.md for the compose stack (lmgate + Prometheus + Grafana).
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
RUN pip install --no-cache-dir . \
    && rm -rf /src

# Unprivileged runtime user (fixed uid/gid so volume permissions are predictable), and its
# state dir: old-API jobs and token quotas (lmgate.sqlite3) survive a new container there.
RUN groupadd --system --gid 10001 lmgate \
    && useradd --system --uid 10001 --gid lmgate --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin lmgate \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/lmgate
ENV LMGATE_STATE_DIR=/var/lib/lmgate
VOLUME ["/var/lib/lmgate"]

WORKDIR /
USER 10001:10001

# Listen on all interfaces inside the container; override upstream at run time.
ENV LMGATE_HOST=0.0.0.0
EXPOSE 1235

# slim has no curl: use the stdlib. Exits non-zero unless /healthz returns 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:1235/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["lmgate"]
