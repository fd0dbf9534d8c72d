#!/usr/bin/env bash
# Quick start, command 1: set everything up, then run the hub on http://127.0.0.1:8080.
#
# Runs scripts/setup.sh, creates a development API key once (roles user, admin, auditor and
# operator; kept in .state/keys.json, the key itself in .state/dev-api-key, mode 0600, so that
# every run can print it again), prints the key and the URL, then replaces itself with
#   agent-gateway serve --host 127.0.0.1 --port 8080 --state-dir .state --keys .state/keys.json
# Extra arguments are passed on to `serve` (e.g. scripts/run.sh --port 9090).
# Delete .state/keys.json and .state/dev-api-key to get a new development key.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'run: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

bash "$root/scripts/setup.sh"

gateway="$root/.venv/bin/agent-gateway"
state="$root/.state"
keys="$state/keys.json"
keyfile="$state/dev-api-key"
mkdir -p "$state"
chmod 700 "$state"

if [ ! -f "$keys" ]; then
    log "creating a development API key (subject dev; roles user, admin, auditor, operator)"
    out="$(umask 077 && "$gateway" keys create --keys "$keys" --subject dev \
        --roles user,admin,auditor,operator)" || die "'agent-gateway keys create' failed"
    # The key (agk_<id>_<secret>) is what the command prints on stdout.
    key="$(printf '%s\n' "$out" | grep -oE 'agk_[0-9a-f]+_[A-Za-z0-9_-]+' | tail -n 1 || true)"
    [ -n "$key" ] || die "'agent-gateway keys create' printed no key"
    (umask 077 && printf '%s\n' "$key" >"$keyfile")
    chmod 600 "$keyfile" "$keys"
fi

# The address serve will listen on: the defaults, unless the extra arguments change them.
host=127.0.0.1
port=8080
prev=""
for arg in "$@"; do
    case "$prev" in
    --host) host="$arg" ;;
    --port) port="$arg" ;;
    esac
    case "$arg" in
    --host=*) host="${arg#--host=}" ;;
    --port=*) port="${arg#--port=}" ;;
    esac
    prev="$arg"
done
case "$host" in
0.0.0.0 | "") url_host=127.0.0.1 ;;
*:*) url_host="[$host]" ;;
*) url_host="$host" ;;
esac

echo
if [ -s "$keyfile" ]; then
    echo "  Development API key: $(cat "$keyfile")"
    echo "                       (also in $keyfile)"
else
    echo "  Development API key: not stored here ($keys was made without this script;"
    echo "                       delete it to get a new key on the next run)"
fi
echo "  Gateway URL:         http://$url_host:$port"
echo "  API description:     http://$url_host:$port/openapi.json"
echo

exec "$gateway" serve --host 127.0.0.1 --port 8080 --state-dir "$state" --keys "$keys" "$@"
