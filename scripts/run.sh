#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then the main job on its embedded default:
# quantize a synthetic Llama-3-8B layer KV cache with every format on the
# default OpenCL device and print error and throughput per format.
# Extra arguments go to `clkvq-bench quant` (e.g. --tokens 8192 --json).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh" >&2
exec "${BUILD_DIR:-$repo/build}/clkvq-bench" quant "$@"
