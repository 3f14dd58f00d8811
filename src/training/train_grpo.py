"""Critic-free policy gradient, RLOO or GRPO: k responses per prompt, each judged against its
group (no value model), from an SFT checkpoint against a reward model or reward function.

Usage, from src/ (or from the repository root as python src/training/train_grpo.py):
    python training/train_grpo.py --config ../configs/imdb/grpo.yaml -a ../runs/sft_imdb_<time> --reward ../runs/rm_imdb_<time>
    python training/train_grpo.py ... --grpo.estimator rloo      # leave-one-out baseline, KL in the reward
    python training/train_grpo.py --config ../configs/hh/grpo.yaml -a ../runs/sft_hh_<time> --reward ../runs/rm_hh_<time>
    python training/train_grpo.py --resume                     # the latest run of this -n name

Flags: -a/--actor (SFT checkpoint or run folder), --reward (reward-model checkpoint or run
folder, or a function module:function / file.py:function), -b/--batch-size (responses per
iteration: prompts x grpo.group_size), -n/--exp-name, --config FILE, --resume [RUN_DIR], and
any --section.key value (--help lists them). Outputs go to runs/grpo_<name>_<time>/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # src/, for runs without pip install

from gpt2rlhf.stages.grpo import main  # noqa: E402

if __name__ == "__main__":
    main(usage=__doc__)
