#!/bin/bash
# usage: launch.sh SCRIPT TIMEOUT [args...]  -- starts 2 processes, prefixes output
S=$1; T=$2; shift 2
PORT=$((20000 + RANDOM % 20000))
cd /tmp/xproc
timeout -s KILL $T python $S 0 $PORT "$@" > /tmp/xproc/out0.log 2>&1 &
P0=$!
timeout -s KILL $T python $S 1 $PORT "$@" > /tmp/xproc/out1.log 2>&1 &
P1=$!
wait $P0; R0=$?; wait $P1; R1=$?
echo "== rc p0=$R0 p1=$R1"
echo "== p0"; grep -v "^\s*$" out0.log | tail -40
echo "== p1"; grep -v "^\s*$" out1.log | tail -40
