#!/usr/bin/env bash
# Every program refuses a bad numeric argument the same way: exit status 2
# and a message that names the flag and repeats what was typed, before any
# device is touched. atoi/atof used to read "abc" as 0 and "nan" as a
# number that passed the "not negative" checks.
#
# usage: cli_bad_args.sh CLKVQ_TUNE CLKVQ_EVAL CLKVQ_SYNTH_DUMP DUMP_CHECK [CLKVQ_BENCH]
set -u

tune=$1 eval_=$2 synth=$3 dump_check=$4 bench=${5:-}
failures=0 checked=0

# expect FLAG VALUE PROGRAM ARGS...: ARGS must hold "FLAG VALUE" (or VALUE
# in FLAG's position, for positional arguments).
expect() {
  local flag=$1 value=$2
  shift 2
  local err rc
  # a program that takes the value for a number would go on to tune or
  # evaluate: cut it short, it has failed already
  err=$(timeout 30 "$@" 2>&1 >/dev/null)
  rc=$?
  checked=$((checked + 1))
  if [[ $rc -ne 2 || $err != *"$flag"* || $err != *"'$value'"* ]]; then
    echo "FAIL: $* -> exit $rc, stderr: $err"
    failures=$((failures + 1))
  fi
}

for v in nan abc -1 1e999 inf "" " 5" 5x; do
  expect --budget "$v" "$tune" --budget "$v"
done
expect --group 3x "$tune" --group 3x
expect --batch 0 "$tune" --batch 0
expect --batch 1.5 "$tune" --batch 1.5
expect --reps abc "$tune" --reps abc
expect --tokens 4096, "$tune" --tokens 4096,
expect --tokens 1,nan "$tune" --tokens 1,nan
expect --tokens 1,x "$tune" --tokens 64 --tokens 1,x
expect --residual abc "$tune" --config x.yaml --residual abc
expect --residual 1e3 "$tune" --config x.yaml --residual 1e3
for v in q32:kv8:dx:l32 q0:kv8:d128:l32 q32:kv8:d128 q32:kv8:d128:l32:l1 q30:kv8:d128:l32 " q32:kv8:d128:l32"; do
  expect --geometry "$v" "$tune" --geometry "$v"
done
expect --model nonesuch "$tune" --model nonesuch

for v in nan abc 0 9 -3; do
  expect --budget "$v" "$tune" precision --calib x.safetensors --budget "$v"
done
expect --queries abc "$tune" precision --calib x --budget 3 --queries abc
expect --clusters -2 "$tune" precision --calib x --budget 3 --clusters -2
expect --group 32k "$tune" precision --calib x --budget 3 --group 32k
expect --window x "$tune" precision --calib x --budget 3 --window x
expect --sinks nan "$tune" precision --calib x --budget 3 --sinks nan
expect --residual 1e3 "$tune" precision --calib x --budget 3 --residual 1e3

expect --queries abc "$eval_" --calib x --scheme fp16 --queries abc
expect --queries nan "$eval_" --calib x --scheme fp16 --queries nan
expect group 3x "$eval_" --calib x --scheme token:k4v4:g3x
expect clip nan "$eval_" --calib x --scheme token:k4v4:anan

expect --tokens abc "$synth" -o x.st --tokens abc
expect --layers 0 "$synth" -o x.st --layers 0
expect --seed -1 "$synth" -o x.st --seed -1
expect --peak nan "$synth" -o x.st --peak nan
expect --peak abc "$synth" -o x.st --peak abc

expect LAYERS abc "$dump_check" write x.st f32 abc 2 1 4 8 1 m /dev/null
expect SEED -1 "$dump_check" write x.st f32 1 2 1 4 8 -1 m /dev/null
expect TOKENS nan "$dump_check" write x.st f32 1 2 1 nan 8 1 m /dev/null

if [[ -n $bench ]]; then
  expect --reps abc "$bench" quant --reps abc
  expect --tokens nan "$bench" quant --tokens nan
  expect --group " 32" "$bench" quant --group " 32"
  expect --tokens 1,abc "$bench" attention --tokens 1,abc
  expect --batch nan "$bench" attention --batch nan
  expect --synth-cache-mb -5 "$bench" attention --synth-cache-mb -5
  expect --kernel serial:8x:512 "$bench" attention --kernel serial:8x:512
  expect --kernel fast:8:512 "$bench" attention --kernel fast:8:512
  expect --tokens 4k "$bench" append --tokens 4k
  expect --reps 0 "$bench" append --reps 0
  expect --tokens abc "$bench" decode --tokens abc
  expect --wgs 1e3 "$bench" decode --wgs 1e3
  expect --waves nan "$bench" decode --waves nan
  expect --heads 32/8 "$bench" decode --heads 32/8
  expect --calls 0 "$bench" decode --calls 0
fi

echo "$checked bad arguments, $failures not refused as usage errors"
[[ $failures -eq 0 ]]
