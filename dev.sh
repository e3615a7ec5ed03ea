#!/usr/bin/env bash
# abdag's two entry points on a fresh machine:
#   ./dev.sh demo   set up, then run the demo on the embedded stack (the main job)
#   ./dev.sh test   set up, then run the test suite
#   ./dev.sh bench  set up (and the Quix Streams peer's own venv), then bench.run_all [ARGS]
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

# The benchmarks' peer, Quix Streams, needs an older confluent-kafka than abdag pins: it
# gets a venv of its own (bench/quix_peer.py finds it at .venv-quix).
bench_setup() {
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[test,bench]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  if [ ! -x .venv-quix/bin/python ] || ! .venv-quix/bin/python -c "import quixstreams" 2>/dev/null; then
    echo "== creating .venv-quix for the Quix Streams peer" >&2
    "$PY" -m venv .venv-quix
    .venv-quix/bin/pip install --quiet --disable-pip-version-check quixstreams==3.28.1 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
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
  bench)
    setup
    bench_setup
    exec "$VENV/bin/python" -m bench.run_all "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./dev.sh demo|test|bench|setup [ARGS...]" >&2
    exit 2
    ;;
esac
