#!/usr/bin/env bash
# The whole pipeline on a small embedded default, CPU only, nothing downloaded:
#   synthetic corpus -> data_prep/tokenize.py -> sbatch slurm/pretrain_olmo2.sh (one-node Slurm it
#   starts; torchrun when Slurm cannot start) for a tiny attention and a tiny memory model ->
#   mcore-to-hf -> eval/niah.py with every method at two budgets -> table + plot.
# A second run reuses what exists. QUICKSTART_SIZE=ci shrinks everything for the CI test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py="$root/.venv/bin/python"
work=${QUICKSTART_DIR:-$root/.quickstart}
size=${QUICKSTART_SIZE:-default}
mkdir -p "$work"
if [ "$size" = ci ]; then
  docs=300; iters=6; samples=1; tasks=niah_single_1,niah_multikey_2; length=384; methods=dense,quest,moba,snapkv,random,dilated
else
  docs=3000; iters=60; samples=2; tasks=all; length=1024; methods=dense,dilated,quest,moba,snapkv,random
fi
budgets=1/2,1/4
step() { printf '\n== %s\n' "$*"; }

step "1/6 corpus (generated offline)"
[ -s "$work/corpus.jsonl" ] || "$py" -m ratplus_megatron.data.synthetic_corpus --output "$work/corpus.jsonl" --documents "$docs"

step "2/6 tokenize"
if [ ! -s "$work/tok/corpus_text_document.idx" ]; then
  "$py" data_prep/tokenize.py --input "$work/corpus.jsonl" --tokenizer data_prep/assets/tiny-bpe \
    --output-prefix "$work/tok/corpus" --workers 2
fi

step "3/6 train a tiny attention model and a tiny memory model"
trained() { [ "$(cat "$work/runs/$1/latest_checkpointed_iteration.txt" 2>/dev/null)" = "$iters" ]; }
if trained attention && trained ratplus; then
  echo "both models already trained to $iters steps: reusing them"
else
  launcher=slurm
  started_slurm=no
  bash scripts/local_slurm.sh status >/dev/null 2>&1 || started_slurm=yes
  if ! bash scripts/local_slurm.sh start; then
    launcher=torchrun
    echo "note: could not start the one-node Slurm cluster; training through torchrun instead"
  fi
  for kind in attention ratplus; do
    trained "$kind" && continue
    save="$work/runs/$kind"
    export RECIPE=configs/tiny_${kind}_cpu.yaml DATA_PREFIX="$work/tok/corpus_text_document" SAVE_DIR="$save" \
           WANDB_MODE=offline EXTRA_ARGS="train.train_iters=$iters checkpoint.save_interval=$iters batch.micro_batch_size=4"
    if [ "$launcher" = slurm ]; then
      sbatch --wait --ntasks-per-node=2 --output="$work/train_$kind-%j.out" slurm/pretrain_olmo2.sh
    else
      "$py" -m torch.distributed.run --standalone --nproc-per-node 2 -m ratplus_megatron.train \
        --config "$RECIPE" data.prefixes=["$DATA_PREFIX"] checkpoint.save="$save" $EXTRA_ARGS
    fi
  done
  # stop the cluster only if this run started it
  if [ "$launcher" = slurm ] && [ "$started_slurm" = yes ]; then bash scripts/local_slurm.sh stop; fi
fi

step "4/6 export both to Hugging Face"
for kind in attention ratplus; do
  [ -s "$work/hf/$kind/config.json" ] || "$py" -m ratplus_megatron.convert mcore-to-hf \
    --ckpt-dir "$work/runs/$kind" --out-dir "$work/hf/$kind" --tokenizer data_prep/assets/tiny-bpe
done

step "5/6 RULER NIAH: $methods at budgets $budgets"
for kind in attention ratplus; do
  "$py" eval/niah.py --model "$work/hf/$kind" --tasks "$tasks" --lengths "$length" --methods "$methods" \
    --budgets "$budgets" --moba-block 16 --samples "$samples" --max-new-tokens 16 --device cpu --dtype fp32 \
    --out "$work/niah/$kind"
done

step "6/6 report"
"$py" eval/report.py "$work/niah/attention" "$work/niah/ratplus" --labels attention,memory --out "$work/report"
cat "$work/report/summary.md"
echo
echo "plot: $work/report/accuracy_vs_budget.png"
