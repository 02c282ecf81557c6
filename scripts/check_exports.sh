#!/usr/bin/env bash
# The shared library's exported surface is exactly the functions declared
# in the public headers: fails (and names them) on any exported symbol that
# no header declares (an internal helper, a table, a test hook that leaked)
# and on any declared function that is not exported (a missing CLKVQ_API).
# Usage: scripts/check_exports.sh [libclkvq.so] [include dir]
# Defaults: build/libclkvq.so and include/ of this repository.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lib="${1:-$repo/build/libclkvq.so}"
include_dir="${2:-$repo/include}"
[[ -f $lib ]] || { echo "check_exports: no library at $lib" >&2; exit 2; }

# Declared: every clkvq_<name>( in the headers. Declarations carry their
# name and opening parenthesis on one line; comments are stripped first.
declared="$(cat "$include_dir"/*.h | sed -e 's,/\*.*\*/,,g' -e '/\/\*/,/\*\//d' |
  grep -oE '\bclkvq_[A-Za-z0-9_]+[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//' | sort -u)"
exported="$(nm -D --defined-only "$lib" | awk 'NF >= 3 {print $3}' | sed 's/@.*//' | sort -u)"

extra="$(comm -23 <(echo "$exported") <(echo "$declared"))"
missing="$(comm -13 <(echo "$exported") <(echo "$declared"))"
n_exported=$(grep -c . <<<"$exported" || true)
n_declared=$(grep -c . <<<"$declared" || true)
echo "check_exports: $lib exports $n_exported symbols; $include_dir declares $n_declared functions"
status=0
if [[ -n $extra ]]; then
  echo "check_exports: exported but not declared in $include_dir:"
  sed 's/^/  /' <<<"$extra"
  status=1
fi
if [[ -n $missing ]]; then
  echo "check_exports: declared but not exported (missing CLKVQ_API or definition):"
  sed 's/^/  /' <<<"$missing"
  status=1
fi
exit $status
