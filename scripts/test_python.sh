#!/usr/bin/env bash
# The Python binding's tests, as a user gets the package: `pip install ./python`
# into a fresh virtual environment (it bundles the library just built), then
# pytest from outside the source tree, so `import clkvq` is the installed one.
# Run by scripts/test.sh after ctest. Env: BUILD_DIR (default <repo>/build).
# Extra arguments go to pytest.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="$(cd "${BUILD_DIR:-$repo/build}" && pwd)"
venv="$build_dir/python-venv"

# --system-site-packages: numpy and pytest come from scripts/setup.sh's pip
# install; the build of the package itself fetches setuptools from PyPI.
rm -rf "$venv"
python3 -m venv --system-site-packages "$venv"
CLKVQ_BUILD_DIR="$build_dir" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "$repo/python"

work="$(mktemp -d "${TMPDIR:-/tmp}/clkvq-pytest.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
# -rs prints why anything was skipped (torch and transformers are not in CI);
# pytest's own exit status stands: 5 (no test collected) fails this script.
CLKVQ_BUILD_DIR="$build_dir" CLKVQ_CACHE_DIR="$build_dir/test-cache" OPENBLAS_NUM_THREADS=1 \
  "$venv/bin/python" -m pytest -p no:cacheprovider -q -rs "$repo/python/tests" "$@"
