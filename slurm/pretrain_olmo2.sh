#!/bin/bash
# Continued pretraining of OLMo2 (+ the RAT+ memory) with the megatron-core trainer, on Slurm.
#
# Usage, from the repository root (the job finds the repo through the path of this script):
#
#   RECIPE=configs/olmo2_7b_ratplus_10b.yaml \
#   DATA_PREFIX=/data/dolma/dolma_text_document \
#   SAVE_DIR=/ckpt/olmo2-7b-ratplus INIT_FROM=/ckpt/olmo2-7b-mcore \
#   WANDB_PROJECT=ratplus sbatch --nodes=4 slurm/pretrain_olmo2.sh
#
#   # the attention-only baseline: RECIPE=configs/olmo2_7b_attention_10b.yaml ...
#   # one CPU machine (e.g. the one-node cluster of scripts/local_slurm.sh), tiny recipe:
#   RECIPE=configs/tiny_ratplus_cpu.yaml DATA_PREFIX=... SAVE_DIR=runs/tiny sbatch --ntasks-per-node=2 slurm/pretrain_olmo2.sh
#
# Environment variables (all optional; sbatch exports the submitting shell's environment):
#   RECIPE         recipe YAML (default configs/olmo2_7b_ratplus_10b.yaml)
#   DATA_PREFIX    one or more space-separated indexed-dataset prefixes (PREFIX_text_document, or the
#                  --output-prefix given to data_prep/tokenize.py) -> data.prefixes
#   DATA_WEIGHTS   blend weights, one per prefix, space-separated -> data.weights
#   SAVE_DIR       checkpoint/run directory -> checkpoint.save; a requeued or resubmitted job resumes
#                  from its latest checkpoint (so keep it the same across submissions)
#   INIT_FROM      converted HF checkpoint (python -m ratplus_megatron.convert hf-to-mcore) -> checkpoint.init_from
#   WANDB_PROJECT  -> wandb.project;  WANDB_MODE online|offline|disabled -> wandb.mode (and the env var)
#   EXTRA_ARGS     more trainer overrides, e.g. "train.train_iters=100 parallel.tp=4"
#   VENV           Python environment (default REPO/.venv); REPO: the repository (default: found)
#   LAUNCHER       srun (default: one task per GPU, the trainer reads SLURM_PROCID/SLURM_NTASKS/
#                  SLURM_LOCALID) or torchrun (one torchrun per node, c10d rendezvous)
#   MASTER_PORT    rendezvous port (default 29500 + job id mod 20000)
#
# Nodes, time and GPUs: the #SBATCH lines below are for 8-GPU nodes (H100/H200); override any of
# them on the command line (`sbatch --nodes=8 --time=12:00:00 --account=X --partition=Y ...`).
#
# Time limit and preemption: Slurm sends USR1 to this batch shell 300 s before the time limit
# (--signal=B:USR1@300; give a longer lead for big checkpoints: `sbatch --signal=B:USR1@600`). The
# shell forwards it to the training tasks, the trainer saves a checkpoint and exits, then the shell
# runs `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue under the same id and log file,
# and resumes from the checkpoint. To checkpoint and requeue by hand: `scancel --signal=USR1 --batch JOBID`.
# SIGTERM (preemption with a grace time, scancel, the hard limit) makes the trainer save too; the job
# is requeued only if Slurm still has it RUNNING (preemption), not after `scancel` or a timeout.
#
# No GPUs: the script checks for CUDA devices (nvidia-smi) and, without any, runs the same trainer on
# CPU (gloo; the tasks share the cores, OMP threads split between them). The GPU request of the
# header still has to be satisfiable: scripts/local_slurm.sh declares nominal GPUs for that; on
# another CPU-only cluster add `--gpus-per-node=0` and a --cpus-per-task that fits its nodes.
#
#SBATCH --job-name=olmo2-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail

log() { echo "[pretrain_olmo2 $(date '+%F %T')] $*"; }
die() { log "ERROR: $*" >&2; exit 1; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit with 'sbatch slurm/pretrain_olmo2.sh'"

# ---- the repository: sbatch runs a copy of this file, so find the original through scontrol
if [ -z "${REPO:-}" ]; then
  script=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2-)
  for cand in "${script:+$(dirname "$script")/..}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "$0")/.."; do
    if [ -n "$cand" ] && [ -d "$cand/ratplus_megatron" ]; then REPO=$(cd "$cand" && pwd); break; fi
  done
fi
[ -n "${REPO:-}" ] && [ -d "$REPO/ratplus_megatron" ] || die "cannot find the repository; set REPO=/path/to/ratplus-megatron"
cd "$REPO"

VENV=${VENV:-$REPO/.venv}
PYTHON=$VENV/bin/python
[ -x "$PYTHON" ] || die "no Python at $PYTHON (make env, or set VENV=/path/to/venv)"
RECIPE=${RECIPE:-configs/olmo2_7b_ratplus_10b.yaml}
[ -f "$RECIPE" ] || die "recipe $RECIPE not found (set RECIPE=configs/...yaml)"
LAUNCHER=${LAUNCHER:-srun}

# ---- trainer overrides from the environment
overrides=()
if [ -n "${DATA_PREFIX:-}" ]; then
  prefixes=()
  for p in $DATA_PREFIX; do
    # accept the --output-prefix of data_prep/tokenize.py as well as the full PREFIX_text_document
    if [ ! -e "$p.bin" ] && [ -e "${p}_text_document.bin" ]; then p=${p}_text_document; fi
    prefixes+=("$p")
  done
  overrides+=("data.prefixes=[$(IFS=,; echo "${prefixes[*]}")]")
fi
[ -n "${DATA_WEIGHTS:-}" ] && overrides+=("data.weights=[$(echo $DATA_WEIGHTS | tr ' ' ',')]")
[ -n "${SAVE_DIR:-}" ] && overrides+=("checkpoint.save=$SAVE_DIR")
[ -n "${INIT_FROM:-}" ] && overrides+=("checkpoint.init_from=$INIT_FROM")
[ -n "${WANDB_PROJECT:-}" ] && overrides+=("wandb.project=$WANDB_PROJECT")
[ -n "${WANDB_MODE:-}" ] && overrides+=("wandb.mode=$WANDB_MODE")
# shellcheck disable=SC2206  # word splitting of EXTRA_ARGS is intended
[ -n "${EXTRA_ARGS:-}" ] && overrides+=($EXTRA_ARGS)

# ---- layout and rendezvous
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NTASKS=${SLURM_NTASKS:-1}
TASKS_PER_NODE=$(( NTASKS / NNODES ))
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
# a one-node job on a host whose name does not resolve (some containers): loopback will do
if [ "$NNODES" -eq 1 ] && ! getent hosts "$MASTER_ADDR" >/dev/null 2>&1; then MASTER_ADDR=127.0.0.1; fi
MASTER_PORT=${MASTER_PORT:-$(( 29500 + SLURM_JOB_ID % 20000 ))}
export MASTER_ADDR MASTER_PORT

# ---- GPUs or CPU
ngpu=0
if command -v nvidia-smi >/dev/null 2>&1; then
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ "$ngpu" -gt 0 ]; then
  DEVICE="$ngpu GPU(s) per node"
  [ "$TASKS_PER_NODE" -le "$ngpu" ] || log "warning: $TASKS_PER_NODE tasks per node but $ngpu GPUs"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-8} < 8 ? ${SLURM_CPUS_PER_TASK:-8} : 8 ))}
  # NCCL: the defaults are right on most InfiniBand/RoCE clusters. Uncomment what yours needs:
  # export NCCL_DEBUG=WARN                # INFO to see the transports chosen
  # export NCCL_SOCKET_IFNAME=ib0         # interface for bootstrap/TCP (e.g. ib0, eth0, ^lo,docker)
  # export NCCL_IB_HCA=mlx5               # which HCAs to use
  # export NCCL_IB_GID_INDEX=3            # RoCE v2
  # export NCCL_NET_GDR_LEVEL=PHB         # GPUDirect RDMA reach
  # export NCCL_ASYNC_ERROR_HANDLING=1    # fail fast on a hung collective (TORCH_NCCL_ASYNC_ERROR_HANDLING in new torch)
  # export NCCL_TIMEOUT=1800
  # export NCCL_NVLS_ENABLE=0             # turn off NVLink SHARP / multicast if it misbehaves
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron: overlap of TP comms
else
  DEVICE="no CUDA device: CPU run (gloo)"
  export CUDA_VISIBLE_DEVICES=""  # nominal GPUs of a test cluster are not real devices
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / TASKS_PER_NODE > 0 ? cores / TASKS_PER_NODE : 1 ))}
fi
export PYTHONUNBUFFERED=1

log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) [$SLURM_JOB_NODELIST], $NTASKS tasks, $DEVICE"
log "repo $REPO, python $PYTHON, launcher $LAUNCHER, master $MASTER_ADDR:$MASTER_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS"
log "recipe $RECIPE, overrides: ${overrides[*]:-(none)}"

# ---- launch
# srun no longer reads SLURM_CPUS_PER_TASK from the batch environment (Slurm >= 22.05): pass it.
cpt=()
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && cpt=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
trainer=(-m ratplus_megatron.train --config "$RECIPE" "${overrides[@]}")
# every task says where it runs, then becomes the Python process (signals reach it directly)
announce='echo "[rank ${RANK:-$SLURM_PROCID}/${WORLD_SIZE:-$SLURM_NTASKS}] $(hostname -s) local ${SLURM_LOCALID:-0} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"; exec "$@"'

case "$LAUNCHER" in
  srun)
    # one task per GPU (per rank on CPU); a failing rank ends the step
    srun --kill-on-bad-exit=1 "${cpt[@]}" bash -c "$announce" _ "$PYTHON" -u "${trainer[@]}" &
    forward_sig=USR1 ;;
  torchrun)
    # torchrun itself ignores USR1 (an ignored signal stays ignored across exec; the trainer installs
    # its own handler), so that the signal reaches the workers and not a dying launcher
    srun --kill-on-bad-exit=1 --ntasks="$NNODES" --ntasks-per-node=1 \
      --cpus-per-task=$(( ${SLURM_CPUS_PER_TASK:-1} * TASKS_PER_NODE )) \
      bash -c 'trap "" USR1; exec "$@"' _ "$PYTHON" -u -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$TASKS_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
      "${trainer[@]}" &
    forward_sig=USR1 ;;
  *) die "LAUNCHER must be srun or torchrun, got '$LAUNCHER'" ;;
esac
step_pid=$!

# ---- time limit / preemption: forward, let the trainer save, requeue
got_signal=""
on_signal() {
  [ -n "$got_signal" ] && return
  got_signal=$1
  log "received SIG$1: forwarding SIG$forward_sig to the training tasks (they save a checkpoint and exit)"
  if [ "$LAUNCHER" = srun ]; then
    # srun passes the signal on to every task of the step, on every node
    kill -s "$forward_sig" "$step_pid" 2>/dev/null || true
  else
    # every process of the job's steps on every node (torchrun's workers included), not this shell
    scancel --signal="$forward_sig" "$SLURM_JOB_ID" || kill -s "$forward_sig" "$step_pid" 2>/dev/null || true
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# `wait` returns early when a trapped signal arrives: keep waiting until the step has ended
rc=0
while :; do
  wait "$step_pid"; rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$step_pid" 2>/dev/null; then continue; fi
  if [ "$rc" -gt 128 ] && [ -n "$got_signal" ]; then  # the step ended while the trap ran
    wait "$step_pid" 2>/dev/null; r2=$?; [ "$r2" -ne 127 ] && rc=$r2
  fi
  break
done
# The trainer leaves SAVE_DIR/requeue_requested when a signal stopped it; none and exit 0 means that
# it had finished anyway. A failed step after a signal (e.g. killed while starting up) is requeued too.
if [ -n "$got_signal" ] && [ "$rc" -eq 0 ] && [ -n "${SAVE_DIR:-}" ] && [ ! -e "$SAVE_DIR/requeue_requested" ]; then
  log "SIG$got_signal arrived but training had finished (no $SAVE_DIR/requeue_requested): not requeueing"
  got_signal=""
fi
# SIGTERM also comes from `scancel` and from the hard time limit: requeue only while the job is still
# RUNNING in Slurm's eyes (preemption with a grace time), never a cancelled or timed-out one.
if [ "$got_signal" = TERM ]; then
  state=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
  if [ "$state" != RUNNING ]; then
    log "SIGTERM with the job ${state:-in an unknown state}: not requeueing (resubmit with the same SAVE_DIR to resume)"
    got_signal=""
  fi
fi
if [ -n "$got_signal" ]; then
  log "training step ended (exit $rc) after SIG$got_signal: requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    log "requeued; the next run resumes from the latest checkpoint"
    exit 0
  fi
  log "scontrol requeue failed (job not requeueable?): resubmit with the same SAVE_DIR to resume"
  exit "$rc"
fi
log "training step ended with exit code $rc"
exit "$rc"
