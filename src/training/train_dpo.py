"""DPO (Direct Preference Optimization) from an SFT model on the reward model's preference pairs.

Usage, from src/ (or from the repository root as python src/training/train_dpo.py):
    python training/train_dpo.py --config ../configs/imdb/dpo.yaml -p ../runs/sft_imdb_<time>
    python training/train_dpo.py --config ../configs/hh/dpo.yaml -p ../runs/sft_hh_<time> --dpo.beta 0.05
    python training/train_dpo.py --config ../configs/imdb/dpo.yaml -p ... --dpo.loss ipo --dpo.beta 0.5
    python training/train_dpo.py --resume                       # the latest run of this -n name

Flags: -n/--exp-name, -b/--batch-size (pairs per step), -p/--pretrain (the SFT checkpoint or
run folder: the policy starts from it and it is the reference), --config FILE, --resume
[RUN_DIR], and any --section.key value (--help lists them; dpo.beta, dpo.loss sigmoid|ipo,
dpo.label_smoothing). Outputs go to runs/dpo_<name>_<time>/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # src/, for runs without pip install

from gpt2rlhf.stages.dpo import main  # noqa: E402

if __name__ == "__main__":
    main(usage=__doc__)
