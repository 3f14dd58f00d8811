#!/usr/bin/env bash
# The RLHF pipeline on the IMDB sentiment task, through the real command-line stages:
#   1. SFT        a tiny GPT-2 from scratch on review text          (configs/imdb/sft.yaml)
#   2. RM         sentiment pairs built from the labels             (configs/imdb/rm.yaml)
#   3. PPO        continuations of review openings, rewarded by the RM (configs/imdb/ppo.yaml)
#   4. evaluate   SFT vs PPO on held-out openings: an independent sentiment judge, RM score,
#                 KL and perplexity under SFT, distinct-2, samples  (configs/imdb/eval.yaml)
# then the reward and KL curves of PPO as a PNG. Everything lands in runs/ (or $OUT_DIR):
# the stages' run folders and eval_<name>_<time>/ with report.md, curves.png, times.txt.
#
# Data: $IMDB_DIR if set, else ../shared/data/imdb beside the repository when present,
# else the hub dataset stanfordnlp/imdb (needs the network).
# Usage: bash scripts/pipeline.sh [run-name [options for every training stage...]]
#   e.g. bash scripts/pipeline.sh imdb                       (about 50 minutes on 2 CPU cores)
#        bash scripts/pipeline.sh quick --train.max_steps 5  (a smoke run)
# Per-stage options: $SFT_ARGS, $RM_ARGS, $PPO_ARGS, $EVAL_ARGS (split on spaces). The LLM
# judge runs too when $OPENAI_API_KEY is set (add e.g. EVAL_ARGS="--judge-model gpt-4o-mini").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/src"
NAME="${1:-imdb}"
shift || true
EXTRA=("$@")
OUT_DIR="${OUT_DIR:-runs}"
case "$OUT_DIR" in /*) RUNS="$OUT_DIR" ;; *) RUNS="$ROOT/$OUT_DIR" ;; esac
read -r -a SFT_X <<< "${SFT_ARGS:-}"
read -r -a RM_X <<< "${RM_ARGS:-}"
read -r -a PPO_X <<< "${PPO_ARGS:-}"
read -r -a EVAL_X <<< "${EVAL_ARGS:-}"

DATA_DIR="${IMDB_DIR:-$ROOT/../shared/data/imdb}"
if [ -f "$DATA_DIR/imdb_train.jsonl.gz" ] && [ -f "$DATA_DIR/imdb_test.jsonl.gz" ]; then
  echo "data: $DATA_DIR"
  TRAIN=(--data.train "$DATA_DIR/imdb_train.jsonl.gz")
  TEST=(--data.eval "$DATA_DIR/imdb_test.jsonl.gz")
  EVAL_DATA=(--prompts "$DATA_DIR/imdb_test.jsonl.gz" --sentiment-train "$DATA_DIR/imdb_train.jsonl.gz"
             --sentiment-test "$DATA_DIR/imdb_test.jsonl.gz")
else
  echo "data: the hub dataset stanfordnlp/imdb (no local copy at $DATA_DIR)"
  TRAIN=(--data.train stanfordnlp/imdb)
  TEST=(--data.eval stanfordnlp/imdb --data.eval_split test)
  EVAL_DATA=(--prompts stanfordnlp/imdb --prompts-split test --sentiment-train stanfordnlp/imdb
             --sentiment-test stanfordnlp/imdb)  # evaluate.py reads the hub's train / test splits
fi
JUDGE=(--no-judge)
if [ -n "${OPENAI_API_KEY:-}" ]; then JUDGE=(); fi

STAMP=$(date +%Y%m%d-%H%M%S)
TIMES=()
newest() { ls -d "$RUNS/$1_${NAME}_"* | tail -1; }
stage() {  # stage <label> <command...>: run it, remember how long it took
  local label=$1 t0 secs
  shift
  t0=$(date +%s)
  echo "=== $label: $*"
  "$@"
  secs=$(( $(date +%s) - t0 ))
  TIMES+=("$label $secs s ($(awk "BEGIN{printf \"%.1f\", $secs/60}") min)")
}
start=$(date +%s)
stage sft python training/train_sft.py --config ../configs/imdb/sft.yaml -n "$NAME" --run.out_dir "$RUNS" \
  "${TRAIN[@]}" "${TEST[@]}" "${EXTRA[@]}" "${SFT_X[@]}"
SFT=$(newest sft)
stage rm python training/train_rm.py --config ../configs/imdb/rm.yaml -n "$NAME" --run.out_dir "$RUNS" -p "$SFT" \
  "${TRAIN[@]}" "${TEST[@]}" "${EXTRA[@]}" "${RM_X[@]}"
RM=$(newest rm)
stage ppo python training/train_ppo.py --config ../configs/imdb/ppo.yaml -n "$NAME" --run.out_dir "$RUNS" \
  -a "$SFT" -c "$RM" "${TRAIN[@]}" "${EXTRA[@]}" "${PPO_X[@]}"
PPO=$(newest ppo)
EVAL="$RUNS/eval_${NAME}_$STAMP"
stage evaluate python evaluate.py --config ../configs/imdb/eval.yaml -m "$PPO" -m "$SFT" --names ppo,sft \
  --reward-model "$RM" --reference "$SFT" --out "$EVAL" "${EVAL_DATA[@]}" "${JUDGE[@]}" "${EVAL_X[@]}"
python ../scripts/plot_curves.py "$PPO" --out "$EVAL/curves.png" --title "PPO on IMDB ($NAME)"
TIMES+=("total $(( $(date +%s) - start )) s ($(awk "BEGIN{printf \"%.1f\", ($(date +%s) - $start)/60}") min)")
printf '%s\n' "${TIMES[@]}" > "$EVAL/times.txt"
printf 'sft %s\nrm %s\nppo %s\n' "$SFT" "$RM" "$PPO" > "$EVAL/runs.txt"
echo "=== done"
echo "SFT: $SFT"
echo "RM:  $RM"
echo "PPO: $PPO"
echo "report: $EVAL/report.md (curves.png, times.txt beside it)"
printf '  %s\n' "${TIMES[@]}"
echo "watch it with: tensorboard --logdir $RUNS"
