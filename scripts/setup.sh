#!/usr/bin/env bash
# Set-up for clkvq on Debian: installs the packages that are missing (as root,
# or through sudo when not root), then configures and builds into build/.
# Runnable from any directory. Env: BUILD_DIR (default <repo>/build),
# BUILD_TYPE (default Release), CMAKE_ARGS (extra configure arguments).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${BUILD_DIR:-$repo/build}"
build_type="${BUILD_TYPE:-Release}"

packages=(
  build-essential cmake pkg-config
  ocl-icd-opencl-dev opencl-headers pocl-opencl-icd clinfo
  libclblast-dev check libsubunit-dev libyaml-dev libcjson-dev gnuplot-nox
  python3 python3-pip python3-venv
)

missing=()
for p in "${packages[@]}"; do
  # dpkg -s also succeeds for removed packages that left config files behind.
  if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    sudo_cmd=()
  elif command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "setup: missing packages (${missing[*]}) and not root; run as root or with sudo" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -q
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi

# The dump interop test checks our safetensors reader/writer against the
# real Python packages (numpy + safetensors from PyPI); pytest runs the
# Python binding's tests (scripts/test_python.sh).
if command -v python3 >/dev/null 2>&1 &&
  ! python3 -c "import numpy, safetensors, ml_dtypes, pytest" 2>/dev/null; then
  echo "setup: installing numpy, safetensors, ml_dtypes, pytest (pip)"
  python3 -m pip install --quiet numpy safetensors ml_dtypes pytest 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages numpy safetensors ml_dtypes pytest
fi

jobs="$(nproc 2>/dev/null || echo 2)"
# shellcheck disable=SC2086 # CMAKE_ARGS is a list of words on purpose
cmake -S "$repo" -B "$build_dir" -DCMAKE_BUILD_TYPE="$build_type" ${CMAKE_ARGS:-}
cmake --build "$build_dir" -j "$jobs"
