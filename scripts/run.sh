#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then the main job on its embedded default:
# clkvq-tune fits the decode kernels to this machine's default OpenCL device
# (Llama-3-8B shape, 4k and 32k tokens, k4v4 and k2v2), checks every
# candidate against a reference, caches the winners where the library looks
# them up, and prints default vs tuned time per shape.
# Extra arguments go to clkvq-tune (e.g. --quick, --budget 0 for the whole
# space, --json, --shape qwen2.5-7b, or --config FILE --tokens N to tune for a
# layer precision config). Default budget: 45 s per shape.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh" >&2
if [[ " $* " != *" --budget "* && " $* " != *" --quick "* ]]; then
  set -- --budget 45 "$@"
fi
exec "${BUILD_DIR:-$repo/build}/clkvq-tune" "$@"
