#!/usr/bin/env bash
# Quick start, command 2: set everything up, then run every check CI runs:
#   ruff check, ruff format --check, agent-gateway policy test policies/, and pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k registry -x).
# Every check runs even when an earlier one fails; the exit code is pytest's when pytest
# fails (5, "no tests collected", counts as a failure), else 1 when any other check failed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'test: %s\n' "$*" >&2; }

bash "$root/scripts/setup.sh"

bin="$root/.venv/bin"
failed=()
check() {
    local name="$1"
    shift
    log "$name"
    if ! "$@"; then
        log "FAILED: $name"
        failed+=("$name")
    fi
}

check "ruff check" "$bin/ruff" check .
check "ruff format --check" "$bin/ruff" format --check .
check "policy tests" "$bin/agent-gateway" policy test policies/

log "pytest"
rc=0
"$bin/pytest" -q -p no:cacheprovider "$@" || rc=$?
case "$rc" in
0) ;;
5)
    log "FAILED: pytest collected no tests"
    failed+=("pytest (no tests)")
    ;;
*) failed+=("pytest (exit $rc)") ;;
esac

if [ "${#failed[@]}" -gt 0 ]; then
    log "failed checks: $(printf '%s; ' "${failed[@]}" | sed 's/; $//')"
    [ "$rc" -ne 0 ] && exit "$rc"
    exit 1
fi
log "all checks passed"
