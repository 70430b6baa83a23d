#!/usr/bin/env bash
# After bench/gpu_check.sh ROOT: kill -9 a stage mid-run, rerun it, and compare its output files with the
# uninterrupted run's (moved aside first). Usage: bash bench/gpu_kill_check.sh ROOT STAGE SECONDS [STAGE SECONDS ...]
# train is compared by bench/compare_train.py (weights tensor by tensor, the per-step history); with NOISE=1 the
# stage first runs once more uninterrupted, so the kill's difference can be read against two clean runs' own.
set -uo pipefail
ROOT=${1:?usage: bash bench/gpu_kill_check.sh ROOT STAGE SECONDS ...}
shift
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/packages/minibooru${PYTHONPATH:+:$PYTHONPATH}" PREFECT_SERVER_ANALYTICS_ENABLED=false
M=$ROOT/models
RUN=("$PY" -m flows.cli run -c gpu-check -o "data_root=$ROOT/data" -o "runtime.cache_dir=$ROOT/cache"
     -o "tag.model=$M/wd-swinv2-tagger-v3-random" -o "cache.model=$M/sd15-random.safetensors"
     -o "train.model=$M/sd15-random.safetensors" ${GC_EXTRA:-})
digest() {  # every output file but the manifest and the report (they hold times), relative path + sha256
  (cd "$1" && find . -type f ! -name manifest.json ! -name 'summary.json' ! -path './visuals/*' ! -path './report*' \
     -print0 | sort -z | xargs -0 sha256sum)
}
while (($#)); do
  stage=$1 after=$2; shift 2
  out=$(ls -d "$ROOT/data/$stage"/*/ 2>/dev/null | grep -v _work | head -1)
  [[ -n $out ]] || { echo "kill_check: no $stage output under $ROOT/data (run bench/gpu_check.sh first)"; exit 1; }
  ref=$ROOT/ref-$stage; rm -rf "$ref"; mv "$out" "$ref"
  if [[ ${NOISE:-0} == 1 ]]; then  # a second uninterrupted run: how far two clean runs differ
    t0=$(date +%s.%N)
    "${RUN[@]}" "$stage" > "$ROOT/repeat-$stage.log" 2>&1
    echo "kill_check: $stage uninterrupted again (exit $?) in $(echo "$(date +%s.%N) - $t0" | bc)s"
    rep=$(ls -d "$ROOT/data/$stage"/*/ | grep -v _work | head -1)
    rm -rf "$ROOT/repeat-$stage"; mv "$rep" "$ROOT/repeat-$stage"
    [[ $stage == train ]] && { echo "kill_check: two uninterrupted runs:"; "$PY" bench/compare_train.py "$ref" "$ROOT/repeat-$stage"; }
  fi
  t0=$(date +%s.%N)
  setsid "${RUN[@]}" "$stage" > "$ROOT/kill-$stage.log" 2>&1 &
  pid=$!
  sleep "$after"
  kill -9 -- "-$pid"; wait "$pid" 2>/dev/null
  echo "kill_check: $stage killed (kill -9 of its process group) after ${after}s; work left: $(du -sh "$ROOT/data/$stage" | cut -f1)"
  t1=$(date +%s.%N)
  "${RUN[@]}" "$stage" > "$ROOT/resume-$stage.log" 2>&1; rc=$?
  t2=$(date +%s.%N)
  grep -E "resum|shard|chunk|journal" "$ROOT/resume-$stage.log" | grep -v "^\s*$" | tail -4
  new=$(ls -d "$ROOT/data/$stage"/*/ | grep -v _work | head -1)
  if diff <(digest "$ref") <(digest "$new") > "$ROOT/diff-$stage.txt"; then same=identical; else same=DIFFERENT; fi
  printf 'kill_check: %s rerun exit %s in %.1fs (killed run %.1fs); %d output files %s to the uninterrupted run\n' \
    "$stage" "$rc" "$(echo "$t2 - $t1" | bc)" "$(echo "$t1 - $t0" | bc)" "$(digest "$new" | wc -l)" "$same"
  [[ $same == identical ]] || head -20 "$ROOT/diff-$stage.txt"
  if [[ $stage == train ]]; then
    grep -E "resum|checkpoint" "$ROOT/resume-$stage.log" | head -5
    echo "kill_check: killed + resumed vs uninterrupted:"; "$PY" bench/compare_train.py "$ref" "$new"
  fi
done
