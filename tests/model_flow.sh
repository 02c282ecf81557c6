#!/usr/bin/env bash
# The three steps of the README on a real KVTuner preset, through the
# programs: tune for the Llama-3.1-8B kivi 3.25-bit preset at 4096 tokens
# (clkvq-tune --config ... --quick), then open the model's cache by name and
# check that every one of its 32 layers found an exact tuning entry; before
# the tuning none did, and a cache of another capacity finds nearest ones.
#
# usage: model_flow.sh CLKVQ_TUNE MODEL_CACHE_CHECK PRESET
set -u
tune=$1 check=$2 preset=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# programs built by the other suites serve this fresh cache dir too
if [[ -n ${CLKVQ_CACHE_DIR:-} && -d $CLKVQ_CACHE_DIR/programs ]]; then
  ln -s "$CLKVQ_CACHE_DIR/programs" "$tmp/programs"
fi
export CLKVQ_CACHE_DIR=$tmp

fail() {
  echo "FAIL: $*"
  exit 1
}
expect() { # expect TEXT WHAT: WHAT holds TEXT
  [[ $2 == *"$1"* ]] || fail "'$1' not in:"$'\n'"$2"
}

out=$("$check" llama-3.1-8b 4096 1)
rc=$?
[[ $rc -eq 1 ]] || fail "before tuning: exit $rc, want 1 (not every layer exact): $out"
expect "config shipped:Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_1.yaml" "$out"
expect "exact 0/32" "$out"

out=$("$tune" --config "$preset" --tokens 4096 --quick --reps 1 2>"$tmp/stderr") ||
  fail "clkvq-tune --config: exit $?: $(tail -5 "$tmp/stderr")"
echo "$out"
expect "model llama-3.1-8b, q32:kv8:d128:l32, 3.25 average bits" "$out"
for pair in "kivi K2V2 g32 | 0,4,25,27 |" "kivi K4V4 g32 |" "kivi K4V2 g32 |" \
  "kivi K8V4 g32 | 13,17 |"; do
  expect "| $pair" "$out"
done
expect "lookup: every layer finds an exact tuning entry (32 layers, 4 settings" "$out"
expect "config stored as $tmp/configs/llama-3.1-8b.yaml" "$out"

out=$("$check" llama-3.1-8b 4096 1)
rc=$?
echo "$out" | tail -2
[[ $rc -eq 0 ]] || fail "after tuning: exit $rc, want 0 (every layer exact): $out"
expect "config $tmp/configs/llama-3.1-8b.yaml" "$out"
expect "exact 32/32" "$out"

out=$("$check" meta-llama/Llama-3.1-8B-Instruct 8192 1)
[[ $? -eq 1 ]] || fail "another capacity should not be exact: $out"
expect "layer 0: nearest" "$out"

out=$("$tune" --show) || fail "clkvq-tune --show: exit $?"
expect "llama-3.1-8b.yaml: model llama-3.1-8b, q32:kv8:d128:l32, 32 layers" "$out"
expect "tuned at tokens 4096 batch 1" "$out"
expect "4 of 4 layer settings tuned on this device" "$out"

# refused with the mismatch named, before any tuning
err=$("$tune" --config "$preset" --model qwen2.5-7b --tokens 64 --quick 2>&1 >/dev/null)
[[ $? -eq 1 ]] || fail "a config for another model was not refused: $err"
expect "the config has 32 layers, the model 28" "$err"
echo "model flow: ok"
