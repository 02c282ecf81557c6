#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then the whole test suite (ctest), except the
# Oclgrind sweep (label oclgrind: minutes in the simulator; .ci/run runs it),
# then the Python binding's tests (scripts/test_python.sh: pip install
# ./python into a fresh venv, pytest). Extra arguments go to ctest (e.g.
# -R test_format); CLKVQ_SKIP_PYTHON=1 runs ctest alone.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
ctest --test-dir "${BUILD_DIR:-$repo/build}" --output-on-failure -LE oclgrind "$@"
if [[ ${CLKVQ_SKIP_PYTHON:-0} != 1 ]]; then
  bash "$repo/scripts/test_python.sh"
fi
