#!/usr/bin/env bash
# The RLHF pipeline through the real command-line stages, with the presets of configs/$TASK/:
#   1. SFT        train_sft.py  (sft.yaml)
#   2. RM         train_rm.py   (rm.yaml), from the SFT model
#   3. $ALGO      ppo (default): train_ppo.py (ppo.yaml), actor from SFT, critic and reward
#                 from the RM; dpo: train_dpo.py (dpo.yaml), from SFT on the RM's pairs (the
#                 RM is still trained: the evaluation reports its score of both models);
#                 grpo / rloo: train_grpo.py (grpo.yaml), actor from SFT, reward from the RM
#   4. evaluate   evaluate.py   (eval.yaml), the stage-3 model against SFT
# then stage 3's training curves as a PNG. Everything lands in runs/ (or $OUT_DIR): the
# stages' run folders and eval_<name>_<time>/ with report.md, curves.png, times.txt.
#
# TASK=imdb (default, 2 CPU cores): a tiny GPT-2 from scratch on IMDB review text; RM on
#   sentiment pairs from the labels; PPO continues review openings; the report adds an
#   independent sentiment judge. Data: $IMDB_DIR, else ../shared/data/imdb beside the
#   repository when present, else the hub dataset stanfordnlp/imdb (needs the network).
# TASK=hh (one GPU, real GPT-2 weights): gpt2-medium + LoRA on Anthropic/hh-rlhf, judged by
#   an LLM when $OPENAI_API_KEY is set (data and weights from the hub, or local copies through
#   the per-stage options below).
# Usage: bash scripts/pipeline.sh [run-name [options for every training stage...]]
#   e.g. bash scripts/pipeline.sh imdb                       (about 50 minutes on 2 CPU cores)
#        bash scripts/pipeline.sh quick --train.max_steps 5  (a smoke run)
#        TASK=hh bash scripts/pipeline.sh hh                  (GPU)
#        ALGO=dpo bash scripts/pipeline.sh imdb_dpo           (DPO in place of PPO)
#        ALGO=grpo bash scripts/pipeline.sh imdb_grpo         (GRPO; ALGO=rloo: RLOO)
# Per-stage options: $SFT_ARGS, $RM_ARGS, $PPO_ARGS, $DPO_ARGS, $GRPO_ARGS, $EVAL_ARGS (split on spaces). The LLM
# judge runs when $OPENAI_API_KEY is set (EVAL_ARGS="--judge-model ..." to choose it).
# Interrupted? RESUME=1 bash scripts/pipeline.sh <same name>: each training stage continues
# its latest run of that name from its last checkpoint (a finished one returns at once);
# the evaluation is made again in a new folder.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/src"
TASK="${TASK:-imdb}"
CONF="../configs/$TASK"
if [ ! -f "$CONF/sft.yaml" ]; then echo "error: TASK=$TASK: no configs/$TASK/sft.yaml" >&2; exit 2; fi
ALGO="${ALGO:-ppo}"  # stage 3: one case below per algorithm
case "$ALGO" in
  ppo|dpo|grpo) STAGE3="$ALGO" ;;
  rloo) STAGE3=grpo ;;  # the critic-free stage with the leave-one-out baseline
  *) echo "error: ALGO=$ALGO: choose ppo, dpo, grpo or rloo" >&2; exit 2 ;;
esac
NAME="${1:-$TASK}"
shift || true
EXTRA=("$@")
OUT_DIR="${OUT_DIR:-runs}"
case "$OUT_DIR" in /*) RUNS="$OUT_DIR" ;; *) RUNS="$ROOT/$OUT_DIR" ;; esac
read -r -a SFT_X <<< "${SFT_ARGS:-}"
read -r -a RM_X <<< "${RM_ARGS:-}"
read -r -a PPO_X <<< "${PPO_ARGS:-}"
read -r -a DPO_X <<< "${DPO_ARGS:-}"
read -r -a GRPO_X <<< "${GRPO_ARGS:-}"
read -r -a EVAL_X <<< "${EVAL_ARGS:-}"

TRAIN=() TEST=() EVAL_DATA=()
if [ "$TASK" = imdb ]; then
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
fi
JUDGE=(--no-judge)
if [ -n "${OPENAI_API_KEY:-}" ]; then JUDGE=(); fi

STAMP=$(date +%Y%m%d-%H%M%S)
TIMES=()
newest() { ls -d "$RUNS/$1_${NAME}_"[0-9]* 2>/dev/null | sort -V | tail -1; }  # the stage's latest run of this name
resume_of() {  # RES=(--resume <that run>) when RESUME is set and one exists
  RES=()
  if [ -n "${RESUME:-}" ]; then
    local prev
    prev=$(newest "$1" || true)
    if [ -n "$prev" ]; then RES=(--resume "$prev"); fi
  fi
}
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
resume_of sft
stage sft python training/train_sft.py --config "$CONF/sft.yaml" -n "$NAME" --run.out_dir "$RUNS" "${RES[@]}" \
  "${TRAIN[@]}" "${TEST[@]}" "${EXTRA[@]}" "${SFT_X[@]}"
SFT=$(newest sft)
resume_of rm
stage rm python training/train_rm.py --config "$CONF/rm.yaml" -n "$NAME" --run.out_dir "$RUNS" -p "$SFT" "${RES[@]}" \
  "${TRAIN[@]}" "${TEST[@]}" "${EXTRA[@]}" "${RM_X[@]}"
RM=$(newest rm)
resume_of "$STAGE3"
case "$ALGO" in
  ppo)
    stage ppo python training/train_ppo.py --config "$CONF/ppo.yaml" -n "$NAME" --run.out_dir "$RUNS" "${RES[@]}" \
      -a "$SFT" -c "$RM" "${TRAIN[@]}" "${EXTRA[@]}" "${PPO_X[@]}"
    CURVES=(objective/raw_score objective/kl objective/kl_coef)  # reward-model score, KL to SFT, beta
    ;;
  dpo)
    stage dpo python training/train_dpo.py --config "$CONF/dpo.yaml" -n "$NAME" --run.out_dir "$RUNS" -p "$SFT" \
      "${RES[@]}" "${TRAIN[@]}" "${TEST[@]}" "${EXTRA[@]}" "${DPO_X[@]}"
    CURVES=(objective/rewards_margin objective/rewards_accuracy objective/kl)  # implicit reward, KL to SFT
    ;;
  grpo|rloo)
    stage "$ALGO" python training/train_grpo.py --config "$CONF/grpo.yaml" -n "$NAME" --run.out_dir "$RUNS" \
      "${RES[@]}" -a "$SFT" --reward "$RM" --grpo.estimator "$ALGO" "${TRAIN[@]}" "${EXTRA[@]}" "${GRPO_X[@]}"
    CURVES=(objective/raw_score objective/kl objective/kl_coef)  # reward-model score, KL to SFT, beta
    ;;
esac
POLICY=$(newest "$STAGE3")
EVAL="$RUNS/eval_${NAME}_$STAMP"
stage evaluate python evaluate.py --config "$CONF/eval.yaml" -m "$POLICY" -m "$SFT" --names "$ALGO,sft" \
  --reward-model "$RM" --reference "$SFT" --out "$EVAL" "${EVAL_DATA[@]}" "${JUDGE[@]}" "${EVAL_X[@]}"
python ../scripts/plot_curves.py "$POLICY" --tags "${CURVES[@]}" --out "$EVAL/curves.png" \
  --title "${ALGO^^} on $TASK ($NAME)"
TIMES+=("total $(( $(date +%s) - start )) s ($(awk "BEGIN{printf \"%.1f\", ($(date +%s) - $start)/60}") min)")
printf '%s\n' "${TIMES[@]}" > "$EVAL/times.txt"
printf 'sft %s\nrm %s\n%s %s\n' "$SFT" "$RM" "$ALGO" "$POLICY" > "$EVAL/runs.txt"
echo "=== done"
echo "SFT: $SFT"
echo "RM:  $RM"
echo "${ALGO^^}: $POLICY"
echo "report: $EVAL/report.md (curves.png, times.txt beside it)"
printf '  %s\n' "${TIMES[@]}"
echo "watch it with: tensorboard --logdir $RUNS"
