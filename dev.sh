#!/usr/bin/env bash
# abdag's two entry points on a fresh machine:
#   ./dev.sh demo   set up, then run the demo on the embedded stack (the main job)
#   ./dev.sh test   set up, then run the test suite
# Set-up creates .venv and installs abdag with its pinned dependencies (torch 2.13.0 CPU).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${ABDAG_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.abdag-installed"
  local want
  want="$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "== installing abdag and its dependencies into $VENV (about 2 minutes the first time)" >&2
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip 2>/dev/null || true
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[test]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    setup
    exec "$VENV/bin/abdag" demo "$@"
    ;;
  test)
    setup
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./dev.sh demo|test|setup [ARGS...]" >&2
    exit 2
    ;;
esac
