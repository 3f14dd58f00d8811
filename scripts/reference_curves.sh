#!/usr/bin/env bash
# Reference curves: what a healthy PPO run looks like next to deliberately sick ones, all on
# the IMDB preset (configs/imdb/ppo.yaml) from the same SFT and reward model.
#   healthy   the preset as it is
#   lr10x     actor and critic learning rates 10x too high (3e-3)
#   nokl      no KL penalty (beta 0, not adaptive)
#   nonorm    the reward model's raw scores, without normalisation to mean 0 / std 1
# Usage: bash scripts/reference_curves.sh SFT_RUN RM_RUN [HEALTHY_PPO_RUN]
#   (the pipeline's runs: bash scripts/pipeline.sh ref first; a finished PPO run of the preset
#   may be given as the healthy one instead of training it again). Each variant is a
#   ppo_ref_<variant>_<time> run in runs/ (or $OUT_DIR); RESUME=1 continues each one's latest run.
# Draws docs/reference_curves.png (or $PNG): reward, KL, clipfrac, approxkl, ratio max, entropy,
# explained variance and value loss, every run in its own colour. About 6 minutes per run on 2 CPU cores;
# MAX_STEPS=60 trains the sick variants for 60 iterations instead of the preset's 120.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 2 ]; then sed -n 2,14p "$0" >&2; exit 2; fi
SFT=$(realpath "$1"); RM=$(realpath "$2"); HEALTHY="${3:+$(realpath "$3")}"
cd "$ROOT/src"
OUT_DIR="${OUT_DIR:-runs}"
case "$OUT_DIR" in /*) RUNS="$OUT_DIR" ;; *) RUNS="$ROOT/$OUT_DIR" ;; esac
DATA_DIR="${IMDB_DIR:-$ROOT/../shared/data/imdb}"
if [ ! -f "$DATA_DIR/imdb_train.jsonl.gz" ]; then echo "error: no $DATA_DIR/imdb_train.jsonl.gz (set IMDB_DIR)" >&2; exit 2; fi
PNG="${PNG:-$ROOT/docs/reference_curves.png}"

variant() {  # variant <name> <overrides...>: train it (or resume it), print its run folder last
  local name=$1 prev res=()
  shift
  if [ -n "${RESUME:-}" ]; then
    prev=$(ls -d "$RUNS/ppo_ref_${name}_"[0-9]* 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$prev" ]; then res=(--resume "$prev"); fi
  fi
  echo "=== $name: $*" >&2
  python training/train_ppo.py --config ../configs/imdb/ppo.yaml -n "ref_$name" --run.out_dir "$RUNS" -a "$SFT" \
    -c "$RM" --data.train "$DATA_DIR/imdb_train.jsonl.gz" "${res[@]}" "$@" >&2
  ls -d "$RUNS/ppo_ref_${name}_"[0-9]* | sort -V | tail -1
}
if [ -z "$HEALTHY" ]; then HEALTHY=$(variant healthy); fi
STEPS=(); if [ -n "${MAX_STEPS:-}" ]; then STEPS=(--train.max_steps "$MAX_STEPS"); fi
LR10=$(variant lr10x --optim.lr 3e-3 --critic_optim.lr 3e-3 "${STEPS[@]}")
NOKL=$(variant nokl --ppo.kl_coef 0 --ppo.adaptive_kl false "${STEPS[@]}")
NONORM=$(variant nonorm --ppo.normalize_reward false "${STEPS[@]}")
python ../scripts/plot_curves.py "$HEALTHY" "$LR10" "$NOKL" "$NONORM" \
  --labels "healthy (preset),lr 10x,no KL penalty,no reward normalisation" --columns 4 --window 5 \
  --tags objective/raw_score objective/kl policy/clipfrac policy/approxkl policy/ratio_max objective/entropy \
         val/explained_variance loss/value \
  --title "PPO on IMDB: a healthy run and three sick ones (moving averages of 5 iterations)" --out "$PNG"
printf 'healthy %s\nlr10x %s\nnokl %s\nnonorm %s\n' "$HEALTHY" "$LR10" "$NOKL" "$NONORM"
