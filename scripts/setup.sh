#!/usr/bin/env bash
# Prepare this machine and this checkout for running and testing agent-gateway. Idempotent: a
# second run only checks, and rebuilds the example agent images (cached by Docker).
#
#   1. Debian packages, only when missing and only as root with apt-get: docker.io (when there
#      is neither a dockerd nor a reachable engine), iptables, debootstrap, git, chromium (the
#      audit page's browser test), ca-certificates, python3 and python3-venv (when
#      `python3 -m venv` would not work).
#   2. A Docker engine that answers; as root, starts dockerd in the background when none does
#      (log: /var/log/agent-gateway-dockerd.log).
#   3. The virtualenv .venv with `pip install -e '.[dev]'`, redone only when pyproject.toml
#      changed (its hash is kept in .venv/.installed-hash).
#   4. The base image for agents (scripts/build-base-image.sh when it is missing).
#   5. The example agent images: `.venv/bin/agent-gateway images build --base-image IMAGE`.
#
# Called by scripts/run.sh and scripts/test.sh; may also be run (or sourced) on its own.
# Environment:
#   PYTHON                    interpreter for the virtualenv (default python3; 3.11 or newer)
#   AGENT_GATEWAY_BASE_IMAGE  base image for agents (default agent-gateway/python-base:bookworm)
#   DOCKERD_LOG               dockerd's log (default /var/log/agent-gateway-dockerd.log)
#   DOCKERD_WAIT              seconds to wait for a dockerd we started (default 60)
set -euo pipefail

_setup_main() {
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$root"

    export DEBIAN_FRONTEND=noninteractive
    export AGENT_GATEWAY_BASE_IMAGE="${AGENT_GATEWAY_BASE_IMAGE:-agent-gateway/python-base:bookworm}"
    case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin:/sbin" ;; esac

    local python="${PYTHON:-python3}"
    local venv="$root/.venv"
    local started=$SECONDS

    # One setup at a time on this machine (apt, dockerd and pip do not like company).
    if command -v flock >/dev/null 2>&1; then
        exec 9>"${TMPDIR:-/tmp}/agent-gateway-setup.$(id -u).lock"
        if ! flock -n 9; then
            _log "waiting for another setup to finish"
            flock 9
        fi
    fi

    _setup_packages "$python" "$venv"
    _setup_docker
    _setup_venv "$python" "$venv"

    if docker image inspect "$AGENT_GATEWAY_BASE_IMAGE" >/dev/null 2>&1; then
        _log "base image $AGENT_GATEWAY_BASE_IMAGE present"
    else
        _log "base image $AGENT_GATEWAY_BASE_IMAGE missing: building it"
        bash "$root/scripts/build-base-image.sh" || _die "could not build the base image"
    fi

    _log "building the example agent images (agent-gateway images build)"
    "$venv/bin/agent-gateway" images build --base-image "$AGENT_GATEWAY_BASE_IMAGE" ||
        _die "'agent-gateway images build' failed: the example agent images are not built"

    exec 9>&-
    _log "ready in $((SECONDS - started)) s"
}

_log() { printf 'setup: %s\n' "$*" >&2; }
_die() {
    _log "error: $*"
    exit 1
}

_engine_up() { docker version --format '{{.Server.APIVersion}}' >/dev/null 2>&1; }

_pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

_setup_packages() {
    local python="$1" venv="$2"
    local -a missing=()

    if ! command -v docker >/dev/null 2>&1 || { ! command -v dockerd >/dev/null 2>&1 && ! _engine_up; }; then
        missing+=(docker.io)
    fi
    command -v iptables >/dev/null 2>&1 || missing+=(iptables)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v git >/dev/null 2>&1 || missing+=(git)
    # The auditor page's browser test drives a real headless Chromium.
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    # The PostgreSQL store's tests and bench start throwaway clusters (gateway/store/pg_server.py).
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
    if command -v dpkg-query >/dev/null 2>&1; then
        _pkg_installed ca-certificates || missing+=(ca-certificates)
    else
        [ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
    fi
    if ! command -v "$python" >/dev/null 2>&1; then
        missing+=(python3 python3-venv)
    elif [ ! -x "$venv/bin/python" ] && ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        # Debian's python3 ships venv without ensurepip: `python3 -m venv` then fails.
        missing+=(python3-venv)
    fi

    if [ "${#missing[@]}" -eq 0 ]; then
        _log "system packages present"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        _die "missing: ${missing[*]}; install them (as root: apt-get install ${missing[*]})"
    fi

    _log "installing ${missing[*]} (apt-get)"
    if [[ " ${missing[*]} " == *" postgresql "* ]]; then
        # Only the server's binaries: no system cluster is created, so none is started.
        mkdir -p /etc/postgresql-common/createcluster.d
        echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/agent-gateway.conf
    fi
    local aptlog
    aptlog="$(mktemp "${TMPDIR:-/tmp}/agent-gateway-apt.XXXXXX")"
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$aptlog" 2>&1 9>&-; then
        tail -n 20 "$aptlog" >&2
        rm -f "$aptlog"
        _die "apt-get could not install: ${missing[*]}"
    fi
    rm -f "$aptlog"
}

_setup_docker() {
    if _engine_up; then
        _log "docker engine answers (API $(docker version --format '{{.Server.APIVersion}}'))"
        return 0
    fi
    if [ -n "${DOCKER_HOST:-}" ]; then
        _die "no Docker engine answers at DOCKER_HOST=$DOCKER_HOST"
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v dockerd >/dev/null 2>&1; then
        _die "no Docker engine answers; start one (e.g. 'sudo systemctl start docker') or run this as root"
    fi

    local log="${DOCKERD_LOG:-/var/log/agent-gateway-dockerd.log}"
    local wait_s="${DOCKERD_WAIT:-60}"
    local pidfile=/var/run/docker.pid pid=""
    [ -s "$pidfile" ] && pid="$(cat "$pidfile" 2>/dev/null || true)"

    if [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q dockerd "/proc/$pid/comm" 2>/dev/null; then
        _log "dockerd (pid $pid) is running but not answering yet; waiting"
    elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 &&
        systemctl start docker >/dev/null 2>&1; then
        _log "started docker with systemctl"
    else
        if [ -e "$pidfile" ]; then
            _log "removing stale $pidfile${pid:+ (pid $pid is gone)}"
            rm -f "$pidfile"
        fi
        mkdir -p "$(dirname "$log")"
        _log "starting dockerd (log: $log)"
        # setsid: its own session, so a Ctrl-C in this terminal does not stop it.
        # 9>&-: it must not inherit (and hold for ever) the setup lock.
        setsid nohup dockerd >>"$log" 2>&1 </dev/null 9>&- &
        pid=$!
    fi

    local deadline=$((SECONDS + wait_s))
    until _engine_up; do
        if [ -n "$pid" ] && [ ! -d "/proc/$pid" ]; then
            tail -n 20 "$log" >&2 2>/dev/null || true
            _die "dockerd exited at start (see $log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$log" >&2 2>/dev/null || true
            _die "dockerd did not answer within ${wait_s} s (see $log)"
        fi
        sleep 1
    done
    _log "docker engine answers (API $(docker version --format '{{.Server.APIVersion}}'))"
}

_setup_venv() {
    local python="$1" venv="$2"
    if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            _die "$python is $("$python" -V 2>&1); agent-gateway needs Python 3.11 or newer (set PYTHON)"
        _log "creating the virtualenv .venv with $("$python" -V 2>&1)"
        rm -rf "$venv"
        "$python" -m venv "$venv" || _die "could not create .venv ($python -m venv)"
    fi

    local want have=""
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    [ -f "$venv/.installed-hash" ] && have="$(cat "$venv/.installed-hash")"
    if [ "$want" = "$have" ] && [ -x "$venv/bin/agent-gateway" ]; then
        _log "virtualenv up to date"
        return 0
    fi

    _log "installing agent-gateway and its dev dependencies into .venv (pip install -e '.[dev]')"
    rm -f "$venv/.installed-hash"
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check -q -e '.[dev]' \
        >"$venv/pip-install.log" 2>&1; then
        tail -n 30 "$venv/pip-install.log" >&2
        _die "pip install -e '.[dev]' failed (full log: .venv/pip-install.log)"
    fi
    printf '%s\n' "$want" >"$venv/.installed-hash"
}

_setup_main "$@"
