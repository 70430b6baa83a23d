#!/usr/bin/env bash
# The gpu-check preset end to end on a GPU machine, from the repo root: real-sized random models, the whole DAG,
# then each stage's wall time and `fm status`.
#
#   bash bench/gpu_check.sh /tmp/gc                 # models + every stage
#   bash bench/gpu_check.sh /tmp/gc train eval      # only these stages (the others' outputs are reused)
#   bash bench/gpu_check.sh /tmp/gc --force train -o train.max_steps=5
#
# Everything lands under ROOT (models/, data/, cache/, run-<time>.log); a rerun with the same ROOT reuses the
# models, the generated mini-booru, finished stages and compiled graphs, so a run cut off by a time limit goes
# on where it stopped. Arguments after ROOT go to `fm run` (stage names, --force, -o key=value). PYTHON picks
# the interpreter (default: .venv/bin/python when present, else python3). GC_MODEL_SCALE=tiny uses the demo's
# tiny models instead (a CPU smoke test of this script: add -o runtime.device=cpu and a few stages).
set -uo pipefail

ROOT=${1:?usage: bash bench/gpu_check.sh ROOT [stage ...] [--force] [-o key=value ...]}
shift
ROOT=$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
# the checkout and the mini-booru package importable without an install (a bare GPU image)
export PYTHONPATH="$PWD:$PWD/packages/minibooru${PYTHONPATH:+:$PYTHONPATH}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1

M=$ROOT/models
SCALE=${GC_MODEL_SCALE:-full}
SUFFIX=$([[ $SCALE == full ]] || echo "-$SCALE")
SD=$M/sd15-random$SUFFIX.safetensors
TAGGER=$M/wd-swinv2-tagger-v3-random$SUFFIX
LOG=$ROOT/run-$(date +%Y%m%d-%H%M%S).log
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")'

t=$(now)
"$PY" -m flows.cli models random --out "$M" --scale "$SCALE" || { echo "gpu_check: building the random models failed" >&2; exit 1; }
MODELS_S=$(since "$t")
echo "gpu_check: models ready in ${MODELS_S}s: $SD, $TAGGER"

CFG=(-c gpu-check -o "data_root=$ROOT/data" -o "runtime.cache_dir=$ROOT/cache"
     -o "tag.model=$TAGGER" -o "cache.model=$SD" -o "train.model=$SD")
t=$(now)
"$PY" -m flows.cli run "${CFG[@]}" "$@" 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
RUN_S=$(since "$t")

echo
EXTRA=()  # the -o overrides of the arguments, so status judges the outputs of this same config
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case ${ARGS[i]} in
    -o|--override) EXTRA+=(-o "${ARGS[i+1]:-}"); i=$((i + 1)) ;;
    -o?*) EXTRA+=(-o "${ARGS[i]#-o}") ;;
    --override=*) EXTRA+=(-o "${ARGS[i]#--override=}") ;;
  esac
done
"$PY" -m flows.cli status "${CFG[@]}" "${EXTRA[@]}"
echo
# Each stage's wall time from the run's log: from the end of the previous stage (the flow's start for the
# first) to the flow's "<stage> built|cached: <output>" line, Prefect's own overhead between stages included.
"$PY" - "$LOG" "$MODELS_S" "$RUN_S" "$RC" <<'EOF'
import re
import sys

log, models_s, run_s, rc = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
stamp = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d+) \|")
done = re.compile(r" - (\w+) (built|cached): (\S+)")
start = prev = last = None
rows = []
with open(log, errors="replace") as fh:
    for line in fh:
        m = stamp.match(line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + float("0." + m[4])
        if last is not None and t < last - 43200:  # past midnight
            t += 86400
        last = t
        if start is None and "Beginning flow run" in line:
            start = prev = t
        d = done.search(line)
        if d and prev is not None:
            rows.append((d[1], d[2], t - prev, d[3]))
            prev = t
print(f"gpu_check per-stage wall time (log {log})")
print(f"  {'models':<8} {'':<7} {models_s:8.1f} s   fm models random")
for stage, state, seconds, out in rows:
    print(f"  {stage:<8} {state:<7} {seconds:8.1f} s   {out}")
if start is not None:
    print(f"  {'stages':<8} {'':<7} {(prev or start) - start:8.1f} s   sum of the above")
print(f"  {'fm run':<8} {'':<7} {run_s:8.1f} s   whole command (Prefect server start included), exit status {rc}")
EOF
exit "$RC"
