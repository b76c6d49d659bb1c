#!/usr/bin/env bash
# Wall time of a 12-run suite (digits_lt, ce, seeds 0-11, the data set's 30-epoch recipe)
# with the local launcher at 1 and at 2 parallel jobs, each in a fresh store.
#   scripts/time_local_launcher.sh              # the measurement
#   EPOCHS=2 scripts/time_local_launcher.sh     # a quick try that it works
set -euo pipefail
epochs=${EPOCHS:-30}
jobs_list=${JOBS:-"1 2"}
for jobs in $jobs_list; do
    folder=$(mktemp -d)
    start=$(date +%s.%N)
    (cd "$folder" && ltbench run default 'methods=[ce]' 'seeds=[0,1,2,3,4,5,6,7,8,9,10,11]' \
        "recipe.epochs=$epochs" --launcher local --jobs "$jobs" > leaderboard.md 2> log.txt)
    end=$(date +%s.%N)
    runs=$(grep -c "acc " "$folder/log.txt" || true)
    seconds=$(awk "BEGIN {print $end - $start}")
    printf 'jobs=%s epochs=%s: %d runs in %.1f s (%s)\n' "$jobs" "$epochs" "$runs" "$seconds" "$folder"
done
