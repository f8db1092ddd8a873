#!/bin/bash
# RULER NIAH (eval/niah.py) as a Slurm job array: array task I of N decodes the samples whose index
# is I mod N, for every task, length, method, budget and K/V source, into its own prediction files;
# the task that ends last (finding every prediction in place) writes OUT/summary.json, summary.md and
# accuracy_vs_budget.png.
#
# Usage, from the repository root (the job finds the repo through the path of this script):
#
#   MODEL=/ckpt/olmo2-7b-ratplus-hf OUT=runs/niah-memory \
#   NIAH_ARGS="--tasks all --lengths 4096,32k,128k --methods all --budgets 1/8,1/16,1/32 --samples 500" \
#   sbatch --array=0-7 slurm/niah.sh
#
#   # the attention baseline into its own OUT, then one table of both:
#   #   python eval/report.py runs/niah-memory runs/niah-attention --labels memory,attention --out runs/niah
#   # one CPU machine (e.g. the cluster of scripts/local_slurm.sh), a tiny model:
#   MODEL=... OUT=... NIAH_ARGS="--lengths 512 --samples 4 --device cpu --dtype fp32" sbatch --array=0-1 slurm/niah.sh
#
# Environment variables (sbatch exports the submitting shell's environment):
#   MODEL      HF model dir or hub id with its tokenizer (required; the compute nodes must reach it)
#   OUT        output directory, shared by all array tasks (required)
#   NIAH_ARGS  the other eval/niah.py options (tasks, lengths, methods, budgets, samples, ...); every
#              array task must get the same ones
#   VENV       Python environment (default REPO/.venv); REPO: the repository (default: found)
#
# Array tasks are independent: each one generates the (seeded, identical) data files if they are
# missing and skips samples that any file of OUT already holds, so a failed or requeued task is just
# run again (`sbatch --array=3 slurm/niah.sh` with the same variables). Each task needs one GPU;
# --array=0-7%4 runs at most 4 at a time. Time limit: USR1 reaches this shell 120 s before it; the
# task stops (the predictions of finished batches are on disk) and requeues itself.
#
#SBATCH --job-name=niah
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

set -uo pipefail

log() { echo "[niah $(date '+%F %T')] $*"; }
die() { log "ERROR: $*" >&2; exit 1; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with 'sbatch --array=0-7 slurm/niah.sh'"
[ -n "${MODEL:-}" ] || die "set MODEL=/path/to/hf-model (or a hub id)"
[ -n "${OUT:-}" ] || die "set OUT=/path/to/output-dir (shared by the array tasks)"

# ---- the repository: sbatch runs a copy of this file, so find the original through scontrol
if [ -z "${REPO:-}" ]; then
  script=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2-)
  for cand in "${script:+$(dirname "$script")/..}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "$0")/.."; do
    if [ -n "$cand" ] && [ -d "$cand/eval" ] && [ -f "$cand/eval/niah.py" ]; then REPO=$(cd "$cand" && pwd); break; fi
  done
fi
[ -n "${REPO:-}" ] && [ -f "$REPO/eval/niah.py" ] || die "cannot find the repository; set REPO=/path/to/ratplus-megatron"
VENV=${VENV:-$REPO/.venv}
PYTHON=$VENV/bin/python
[ -x "$PYTHON" ] || die "no Python at $PYTHON (make env, or set VENV=/path/to/venv)"
# relative paths are the submitter's (sbatch starts the job in the submit directory)
case "$OUT" in /*) ;; *) OUT=${SLURM_SUBMIT_DIR:-$PWD}/$OUT ;; esac
if [ -e "${SLURM_SUBMIT_DIR:-$PWD}/$MODEL" ]; then MODEL=$(cd "${SLURM_SUBMIT_DIR:-$PWD}" && realpath "$MODEL"); fi

I=${SLURM_ARRAY_TASK_ID:-0}
N=${SLURM_ARRAY_TASK_COUNT:-1}
# --array=0-7 gives ids 0..7 and count 8; a resubmitted single task (--array=3) keeps the first
# submission's N through NIAH_SHARDS
N=${NIAH_SHARDS:-$N}
[ "$I" -lt "$N" ] || die "array task $I of $N: set NIAH_SHARDS to the first submission's task count"
export PYTHONUNBUFFERED=1
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  export CUDA_VISIBLE_DEVICES=""  # nominal GPUs of a test cluster are not real devices
fi

log "job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_$I restart ${SLURM_RESTART_COUNT:-0}: shard $I/$N on $(hostname -s)"
log "repo $REPO, python $PYTHON, model $MODEL, out $OUT, args: ${NIAH_ARGS:-(defaults)}"
cd "$REPO"
# shellcheck disable=SC2086  # word splitting of NIAH_ARGS is intended
"$PYTHON" -u eval/niah.py --model "$MODEL" --out "$OUT" ${NIAH_ARGS:-} --shard "$I/$N" &
pid=$!

got_signal=""
trap 'got_signal=USR1; log "received SIGUSR1 (time limit): stopping shard $I"; kill -TERM $pid 2>/dev/null' USR1
trap 'got_signal=TERM; kill -TERM $pid 2>/dev/null' TERM
rc=0
while :; do
  wait "$pid"; rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # wait cut short by a trap
  break
done
if [ "$got_signal" = USR1 ]; then
  if scontrol requeue "$SLURM_JOB_ID"; then
    log "requeued; the rerun skips the samples already predicted"
  else
    log "requeue failed: resubmit with 'sbatch --array=$I slurm/niah.sh' (NIAH_SHARDS=$N)"
  fi
  exit 0
fi
log "shard $I/$N ended with exit code $rc"
exit "$rc"
