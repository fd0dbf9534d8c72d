# The gateway's own image: the hub (`agent-gateway serve`) with the repository's agents.yaml,
# schemas/ and policies/ in /app, running as a non-root user.
#
# Build (with a Docker registry):
#   docker build -t agent-gateway:dev .
# Build on a machine without a Docker registry (the base image from scripts/build-base-image.sh):
#   docker build --build-arg BASE_IMAGE=agent-gateway/python-base:bookworm -t agent-gateway:dev .
#
# Python packages: the build stage runs `pip install .` against the package index. Where a
# build container cannot use the index (no network, or a TLS-intercepting proxy whose CA only
# the host trusts), build the wheels on the host first; when the context holds wheels/*.whl
# the build installs from them only (--no-index), building the project itself from source:
#   rm -rf wheels && .venv/bin/pip wheel -q -w wheels . setuptools
#   docker build --build-arg BASE_IMAGE=agent-gateway/python-base:bookworm -t agent-gateway:dev .
#   rm -rf wheels
# (wheels/ is git-ignored; the wheels must match the image's Python, 3.11 on x86_64 here.)
#
# Run: the hub drives Docker, so give it the engine's socket and the socket's group, and keep
# its state (SQLite database, decision log) in a volume:
#   docker run -d -p 8080:8080 -v agent-gateway-state:/var/lib/agent-gateway \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" agent-gateway:dev
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
COPY . /src
RUN set -eu; \
    if ls /src/wheels/*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install --no-index --find-links /src/wheels /src; \
    else \
        /opt/venv/bin/pip install /src; \
    fi; \
    /opt/venv/bin/agent-gateway --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="agent-gateway" \
      org.opencontainers.image.description="A declarative, policy-first gateway for AI agents that run in containers" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/agent-gateway \
        --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /var/lib/agent-gateway \
    && chown gateway:gateway /var/lib/agent-gateway \
    && chmod 700 /var/lib/agent-gateway
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY agents.yaml /app/agents.yaml
COPY schemas/ /app/schemas/
COPY policies/ /app/policies/
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER gateway
VOLUME ["/var/lib/agent-gateway"]
EXPOSE 8080
ENTRYPOINT ["agent-gateway"]
# The file paths are explicit: the CLI's defaults point next to the installed package, which in
# /opt/venv is not where agents.yaml, schemas/ and policies/ are.
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--state-dir", "/var/lib/agent-gateway", \
     "--agents", "/app/agents.yaml", "--schemas", "/app/schemas", "--policies", "/app/policies"]
