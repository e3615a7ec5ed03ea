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

# Debian packages the tests use: docker-compose (checks docker-compose.yml without an
# engine) and chromium + chromium-driver (renders the dashboard headless).
system_packages() {
  local missing=()
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || echo "== could not install ${missing[*]}; the tests that need them will be skipped" >&2
  else
    echo "== ${missing[*]} missing and not root: the tests that need them will be skipped" >&2
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
    system_packages
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
