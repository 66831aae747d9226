# syntax=docker/dockerfile:1
#
# activity-events server image.
#
#   docker build -t activity-events .
#   docker run --rm -p 50051:50051 -p 9464:9464 -e ACTIVITY_REDIS_URL=redis://redis:6379/0 activity-events
#
# The builder resolves and installs the dependencies from pyproject.toml into
# a virtualenv and adds the package as a wheel; the runtime image (the last
# stage, built by default) copies only that virtualenv onto a clean slim base,
# so it has no compilers, no build tools and no source tree.
# tests/test_dockerfile.py runs these same install steps into a fresh
# virtualenv and starts the result. The `dev` stage is for Tilt's live update
# only (docker build --target dev).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, from pyproject.toml alone: a code change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# Then the package itself, as a wheel, without touching the dependencies again.
COPY README.md ./
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-deps /tmp/wheels/activity_events-*.whl


FROM ${PYTHON_IMAGE} AS base

LABEL org.opencontainers.image.title="activity-events" \
      org.opencontainers.image.description="Activity events of deployments on Redis Streams, served over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

# PORT keeps the original service's variable name. ACTIVITY_DATA_DIR is only
# used by the embedded Redis (no ACTIVITY_REDIS_URL); on Kubernetes the chart
# mounts an emptyDir there because the root filesystem is read-only.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=50051 \
    ACTIVITY_METRICS_PORT=9464 \
    ACTIVITY_DATA_DIR=/var/lib/activity-events

# A fixed numeric non-root user, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 activity \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin activity \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/activity-events

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /var/lib/activity-events

# gRPC (PORT) and the HTTP side port (/metrics, /healthz, /readyz).
EXPOSE 50051 9464

# Through sh so the probe follows PORT when it is overridden at run time;
# `activity-client health` exits 0 only when the server reports SERVING.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["sh", "-c", "exec activity-client health --address 127.0.0.1 --port \"$PORT\""]

# SIGTERM starts the graceful stop: health NOT_SERVING, drain, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["activity-server"]


# Development image for Tilt (tilt/Tiltfile): the package is installed in
# editable mode from /src and the virtualenv belongs to the runtime user, so
# live update can sync source into /src and re-install after a dependency
# change. Never deploy it.
FROM base AS dev
USER 0
COPY pyproject.toml README.md /src/
COPY service /src/service
RUN pip install --no-cache-dir --no-deps --editable /src \
    && chown -R 10001:10001 /src /opt/venv
USER 10001:10001


# The production image: the last stage, so a plain `docker build .` builds it.
FROM base AS runtime
