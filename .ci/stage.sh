#!/usr/bin/env bash
# Run one named stage of a build and print how long it took: stage.sh NAME COMMAND [ARGS...]
name=$1; shift
start=$(date +%s)
echo "==> $name"
"$@"
rc=$?
echo "<== $name: $(( $(date +%s) - start ))s (exit $rc)"
exit $rc
