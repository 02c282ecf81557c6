#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then the whole test suite (ctest), except the
# Oclgrind sweep (label oclgrind: minutes in the simulator; .ci/run runs it).
# Extra arguments go to ctest (e.g. -R test_format).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
ctest --test-dir "${BUILD_DIR:-$repo/build}" --output-on-failure -LE oclgrind "$@"
