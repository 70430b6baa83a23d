#!/usr/bin/env bash
# The flow-vs-ε study (issue 19) on a GPU machine, from the repo root, within one call's time limit:
#   bash bench/gpu_study.sh SECONDS [-o key=value ...]
# runs `fm study -c ab-study --write-doc` for at most SECONDS (every stage output is cached and training
# checkpoints, so the same command on the same machine goes on where the last call stopped), then copies the
# log, docs/flow_vs_ddpm.md and its pictures to $OUT (when set).
set -uo pipefail
LIMIT=${1:?usage: bash bench/gpu_study.sh SECONDS [-o key=value ...]}
shift
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/packages/minibooru${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/gpu-study-out}
mkdir -p "$OUTDIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
LOG=$OUTDIR/study-$(date +%Y%m%d-%H%M%S).log
start=$(date +%s)
timeout -k 15 "$LIMIT" "$PY" -m flows.study -c ab-study --write-doc "$@" 2>&1 | tee "$LOG" \
  | grep -E "study|built|cached|step [0-9]+/|samples/s|Error|error|Traceback" | cut -c1-300
rc=${PIPESTATUS[0]}
echo "gpu_study: exit $rc after $(( $(date +%s) - start )) s"
[[ -f docs/flow_vs_ddpm.md ]] && cp docs/flow_vs_ddpm.md "$OUTDIR/" && cp -r docs/flow_vs_ddpm "$OUTDIR/" 2>/dev/null
# What a call finished, small enough to come back even when the study did not end: each eval's results and
# report (not its thousands of PNGs), each train run's manifest and per-step history, the study's folder.
DATA=${STUDY_DATA:-/tmp/booruflow-ab-study/data}
for d in "$DATA"/eval/*/ "$DATA"/train/*/; do
  [[ -d $d && $d != */_work/ ]] || continue
  dest=$OUTDIR/$(basename "$(dirname "$d")")/$(basename "$d")
  mkdir -p "$dest"
  (cd "$d" && find . -maxdepth 2 \( -name '*.parquet' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' \
     -o -path './plots/*' \) -size -8M -exec cp --parents {} "$dest/" \;)
done
[[ -d $DATA/study ]] && cp -r "$DATA/study" "$OUTDIR/" 2>/dev/null
du -sh "$OUTDIR" 2>/dev/null
exit "$rc"
