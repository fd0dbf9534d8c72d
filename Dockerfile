# The gateway's own image: the hub (`agent-gateway serve`) with the repository's agents.yaml,
# schemas/ and policies/ in /app, running as a non-root user.
#
# Build (with a Docker registry):
#   docker build -t agent-gateway:dev .
# Build on a machine without a Docker registry (the base image from scripts/build-base-image.sh):
#   docker build --build-arg BASE_IMAGE=agent-gateway/python-base:bookworm -t agent-gateway:dev .
# tests/integration/test_gateway_image_docker.py builds it that way, through the same build
# context as `agent-gateway images build` (gateway.containers.images.build_context).
#
# Python packages: the build stage runs `pip install .` against the package index. A build
# container does not trust a certificate authority that only the host trusts (a
# TLS-intercepting proxy), and without BuildKit there is no --secret: put the host's CA bundle
# in the context as .host-ca.crt (public data; remove it afterwards) and the build stage,
# only, hands it to pip (PIP_CERT); without the file pip uses the image's own CAs:
#   cp /etc/ssl/certs/ca-certificates.crt .host-ca.crt
#   docker build --build-arg BASE_IMAGE=agent-gateway/python-base:bookworm -t agent-gateway:dev .
# Where the build container cannot reach the index at all, build the wheels on the host first;
# when the context holds wheels/*.whl the build installs from them only (--no-index):
#   rm -rf wheels && .venv/bin/pip wheel -q -w wheels . setuptools
#   docker build --build-arg BASE_IMAGE=agent-gateway/python-base:bookworm -t agent-gateway:dev .
#   rm -rf wheels
# (wheels/ is git-ignored; the wheels must match the image's Python, 3.11 on x86_64 here.)
# The final stage installs iptables from the Debian mirror (apt, plain HTTP).
#
# Run (local engine backend): the hub must be where the agents' bridge networks are, because
# it reaches agents at their addresses on the internal network (which forbids
# container-to-container traffic, so a hub *container* on that network could not be reached by
# them) and fences the host off from those bridges with iptables rules in the host's INPUT
# chain. So the container shares the host's network namespace (--network host) and gets
# NET_ADMIN/NET_RAW for iptables, which the image grants the non-root user through file
# capabilities on the iptables binary only; it drives Docker through the engine's socket
# (with the socket's group), and keeps its state (SQLite database, decision log, keys) in a
# volume:
#   docker run -d --name agent-gateway --network host \
#     --cap-add NET_ADMIN --cap-add NET_RAW \
#     -v agent-gateway-state:/var/lib/agent-gateway \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" agent-gateway:dev
#   docker exec agent-gateway agent-gateway keys create --subject alice --roles user
# The API is then on the host's port 8080, and the agents reach the hub on their network's
# gateway address (the host's bridge), exactly as with `agent-gateway serve` on the host.
# (The engine's socket is root on the host; NET_ADMIN adds nothing to that, it only lets the
# hub keep its agents away from the host.) On a swarm (--backend swarm) the hubs are services
# on the agents' overlay network instead: deploy/compose.yaml.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
# Dependencies first, read from pyproject.toml alone, so their layer stays cached while the
# code changes. pyproject.toml also makes the patterns match something, so a context without
# .host-ca.crt or wheels/ builds (wheels/*.whl land in /tmp/ctx itself).
COPY pyproject.toml .host-ca.cr[t] wheel[s] /tmp/ctx/
RUN set -eu; \
    if [ -s /tmp/ctx/.host-ca.crt ]; then export PIP_CERT=/tmp/ctx/.host-ca.crt; fi; \
    /opt/venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/ctx/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/ctx/requirements.txt; \
    if ls /tmp/ctx/*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install -q --no-index --find-links /tmp/ctx -r /tmp/ctx/requirements.txt; \
    else \
        /opt/venv/bin/pip install -q -r /tmp/ctx/requirements.txt; \
    fi
COPY . /src
RUN set -eu; \
    if [ -s /tmp/ctx/.host-ca.crt ]; then export PIP_CERT=/tmp/ctx/.host-ca.crt; fi; \
    if ls /tmp/ctx/*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install -q --no-deps --no-index --find-links /tmp/ctx /src; \
    else \
        /opt/venv/bin/pip install -q --no-deps /src; \
    fi; \
    /opt/venv/bin/pip check; \
    /opt/venv/bin/agent-gateway --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="agent-gateway" \
      org.opencontainers.image.description="A declarative, policy-first gateway for AI agents that run in containers" \
      org.opencontainers.image.licenses="Apache-2.0"
# iptables for the host firewall (gateway.containers.firewall); the file capabilities let the
# non-root hub run it, and take effect only when the container is given NET_ADMIN/NET_RAW.
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends iptables libcap2-bin >/dev/null; \
    setcap cap_net_admin,cap_net_raw+ep "$(readlink -f /usr/sbin/iptables)"; \
    apt-get purge -y -qq libcap2-bin >/dev/null; \
    rm -rf /var/lib/apt/lists/*
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
COPY limits.yaml /app/limits.yaml
# The CLI's state directory (serve, keys create, tasks, decisions) unless --state-dir says
# otherwise.
ENV AGENT_GATEWAY_STATE_DIR=/var/lib/agent-gateway \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER gateway
VOLUME ["/var/lib/agent-gateway"]
EXPOSE 8080
ENTRYPOINT ["agent-gateway"]
# The file paths are explicit: the CLI's defaults point next to the installed package, which in
# /opt/venv is not where agents.yaml, schemas/, policies/ and limits.yaml are.
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--state-dir", "/var/lib/agent-gateway", \
     "--agents", "/app/agents.yaml", "--schemas", "/app/schemas", "--policies", "/app/policies", \
     "--limits", "/app/limits.yaml"]
