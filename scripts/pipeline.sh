#!/usr/bin/env bash
# The RLHF pipeline on the IMDB sentiment task, through the real command-line stages:
#   SFT (a tiny GPT-2 from scratch on review text) -> reward model (positive vs negative
#   review pairs) -> PPO (continuations of held-out review openings, rewarded by the RM);
#   the before/after evaluation of the IMDB experiment comes with issue 6.
# Data: $IMDB_DIR if set, else ../shared/data/imdb beside the repository when present,
# else the hub dataset stanfordnlp/imdb (needs the network).
# Usage: bash scripts/pipeline.sh [run-name [options for every stage...]]
#   e.g. bash scripts/pipeline.sh imdb                      (about 40 minutes on 2 CPU cores)
#        bash scripts/pipeline.sh quick --train.max_steps 5 (a smoke run)
set -euo pipefail
cd "$(dirname "$0")/../src"
NAME="${1:-imdb}"
shift || true
EXTRA=("$@")
DATA_DIR="${IMDB_DIR:-../../shared/data/imdb}"
if [ -f "$DATA_DIR/imdb_train.jsonl.gz" ]; then
  DATA=(--data.train "$DATA_DIR/imdb_train.jsonl.gz" --data.eval "$DATA_DIR/imdb_test.jsonl.gz")
  echo "data: $DATA_DIR"
else
  DATA=(--data.train stanfordnlp/imdb --data.eval stanfordnlp/imdb --data.eval_split test)
  echo "data: the hub dataset stanfordnlp/imdb (no local copy at $DATA_DIR)"
fi
start=$(date +%s)
python training/train_sft.py --config ../configs/imdb/sft.yaml -n "$NAME" "${DATA[@]}" "${EXTRA[@]}"
SFT=$(ls -d ../runs/sft_"$NAME"_* | tail -1)
python training/train_rm.py --config ../configs/imdb/rm.yaml -n "$NAME" -p "$SFT" "${DATA[@]}" "${EXTRA[@]}"
RM=$(ls -d ../runs/rm_"$NAME"_* | tail -1)
if [ -f "$DATA_DIR/imdb_test.jsonl.gz" ]; then
  PROMPTS=(--data.train "$DATA_DIR/imdb_test.jsonl.gz")
else
  PROMPTS=(--data.train stanfordnlp/imdb --data.train_split test)
fi
python training/train_ppo.py --config ../configs/imdb/ppo.yaml -n "$NAME" -a "$SFT" -c "$RM" "${PROMPTS[@]}" "${EXTRA[@]}"
PPO=$(ls -d ../runs/ppo_"$NAME"_* | tail -1)
echo "SFT: $SFT"
echo "RM:  $RM"
echo "PPO: $PPO"
echo "pipeline took $(( ($(date +%s) - start) / 60 )) min; watch it with: tensorboard --logdir runs"
