"""The five commands through their real entry points (subprocesses from src/, as the README
runs them): --help shows every field's docstring, and a YAML preset + a dotted override + a
short flag reach the run's config.yaml, for SFT, RM and PPO."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import write_reviews

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {"sft": "training/train_sft.py", "rm": "training/train_rm.py", "ppo": "training/train_ppo.py",
            "evaluate": "evaluate.py", "sample": "sample.py"}
# a field's docstring, and an option, that each command's --help must show
HELP_SHOWS = {
    "sft": ("Peak learning rate.", "-n EXP_NAME, --exp-name EXP_NAME", "--resume [RUN_DIR]", "-p PRETRAIN"),
    "rm": ("Examples per forward pass (in each process, under torchrun); the rest are accumulated.", "-b BATCH_SIZE"),
    "ppo": ("beta of the per-token KL penalty (the start value when adaptive).", "-a ACTOR", "-c CRITIC"),
    "evaluate": ("Offline metrics only: no LLM judge.", "-m MODEL, --model MODEL", "--no-judge"),
    "sample": ("Samples per prompt.", "-p PRETRAIN, --pretrain PRETRAIN", "--demo"),
}
TINY = """\
model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 64}
data: {max_length: 48, eval_size: 8}
train: {max_steps: 2, batch_size: 16, log_every: 1, eval_every: 0, save_every: 2}
optim: {lr: 3.0e-4, warmup_steps: 1}
run: {exp_name: from_yaml}
"""
TINY_PPO = """\
data: {eval_size: 8}
prompts: {min_tokens: 2, max_tokens: 6}
ppo: {mini_batch_size: 4, max_new_tokens: 6, normalization_samples: 8}
train: {max_steps: 1, batch_size: 16, save_every: 1}
run: {exp_name: from_yaml}
"""


def command(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, COMMANDS[name], *args], cwd=SRC, capture_output=True, text=True,
                          timeout=300)


def test_every_help_shows_the_fields_docstrings():
    with ThreadPoolExecutor(len(COMMANDS)) as pool:
        results = dict(zip(COMMANDS, pool.map(lambda name: command(name, "--help"), COMMANDS)))
    for name, res in results.items():
        assert res.returncode == 0, (name, res.stderr[-2000:])
        text = " ".join(res.stdout.split())  # the help wraps long docstrings
        for shown in HELP_SHOWS[name]:
            assert shown in text, (name, shown)


def saved_config(out: Path, stage: str) -> dict:
    (run,) = out.glob(f"{stage}_x_*")
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT, RM and PPO, each from its entry point: --config <yaml> --optim.lr 1e-3 -n x and a -b."""
    tmp = tmp_path_factory.mktemp("cli")
    reviews = write_reviews(tmp / "reviews.jsonl", n=32)
    (tmp / "tiny.yaml").write_text(TINY)
    (tmp / "ppo.yaml").write_text(TINY_PPO)
    out = tmp / "runs"
    common = ["--optim.lr", "1e-3", "-n", "x", "--data.train", reviews, "--run.out_dir", str(out)]
    results = {"sft": command("sft", "--config", str(tmp / "tiny.yaml"), *common, "-b", "4")}
    assert results["sft"].returncode == 0, results["sft"].stderr[-3000:]
    sft_run = next(out.glob("sft_x_*"))
    results["rm"] = command("rm", "--config", str(tmp / "tiny.yaml"), *common, "-b", "4", "-p", str(sft_run))
    assert results["rm"].returncode == 0, results["rm"].stderr[-3000:]
    rm_run = next(out.glob("rm_x_*"))
    results["ppo"] = command("ppo", "--config", str(tmp / "ppo.yaml"), *common, "-b", "8", "-a", str(sft_run),
                             "-c", str(rm_run))
    assert results["ppo"].returncode == 0, results["ppo"].stderr[-3000:]
    return out, sft_run, rm_run


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_yaml_override_and_short_flags_reach_config_yaml(runs, stage):
    out, sft_run, rm_run = runs
    cfg = saved_config(out, stage)
    assert cfg["optim"]["lr"] == 1e-3  # the override beats the YAML's 3.0e-4 (or the stage default)
    assert cfg["run"]["exp_name"] == "x"  # -n beats the YAML's from_yaml
    assert cfg["train"]["batch_size"] == (8 if stage == "ppo" else 4)  # -b beats the YAML's 16
    if stage == "ppo":
        assert cfg["actor"]["pretrain"] == str(sft_run) and cfg["critic"]["pretrain"] == str(rm_run)  # -a, -c
        assert cfg["ppo"]["max_new_tokens"] == 6 and cfg["train"]["max_steps"] == 1  # from the YAML
    else:
        assert cfg["model"]["n_layer"] == 1 and cfg["train"]["max_steps"] == 2  # from the YAML
        assert cfg["data"]["max_prompt_length"] == 24  # derived from the YAML's max_length 48
    if stage == "rm":
        assert cfg["model"]["pretrain"] == str(sft_run)  # -p
