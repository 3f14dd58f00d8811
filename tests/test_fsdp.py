"""Sharded full fine-tuning with FSDP2 (train.parallel fsdp, issue 16), on CPU with gloo:
SFT and the reward model in 2 sharded processes follow the 1-process loss curve; the
checkpoint keeps whole weights (every tool reads them) and the optimizer state in shards
(torch.distributed.checkpoint), and resumes on any number of processes: sharded -> 1
process, and a 1-process checkpoint -> 2 sharded processes, to the uninterrupted weights.
What FSDP is not for (LoRA, fp16, PPO) is a clear error."""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_reviews
from test_distributed import common, launch, only_run, scalars

from gpt2rlhf.checkpoint import latest_checkpoint, load_model, verify_checkpoint
from gpt2rlhf.config import ConfigError, PPOConfig, SFTConfig, load_config
from gpt2rlhf.distributed import World
from gpt2rlhf.stages import common as stage_common

STEPS = ["--train.max_steps", "4", "--train.save_every", "2", "--train.keep_checkpoints", "0",
         "--model.n_layer", "2"]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.jsonl", n=64)


def weights(run: Path) -> dict:
    return load_model(latest_checkpoint(run / "checkpoints"), "model").state_dict()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, reviews):
    """The same SFT run in 1 process and in 2 FSDP processes."""
    tmp = tmp_path_factory.mktemp("fsdp")
    runs = {}
    for nproc, extra in ((1, []), (2, ["--train.parallel", "fsdp"])):
        done = launch("sft", common(reviews, tmp / f"np{nproc}", *STEPS, *extra), nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = only_run(tmp / f"np{nproc}")
    return runs


def resume_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of `run` cut back to its step-2 checkpoint, as if killed after it."""
    target = tmp_path / "runs" / run.name
    shutil.copytree(run, target)
    shutil.rmtree(target / "checkpoints" / "step_00000004")
    return target


def test_two_sharded_processes_follow_the_one_process_sft_run(sft_runs):
    one, two = (scalars(sft_runs[n], "loss/train") for n in (1, 2))
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    assert max_diff(weights(sft_runs[1]), weights(sft_runs[2])) <= 1e-5
    # whole weights in model.safetensors, the optimizer in one shard per process, every file digested
    ckpt = latest_checkpoint(sft_runs[2] / "checkpoints")
    meta = verify_checkpoint(ckpt)
    assert {"optimizer/__0_0.distcp", "optimizer/__1_0.distcp", "optimizer/.metadata"} <= set(meta["files"])
    assert "optimizer" not in torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert not list((sft_runs[2] / "checkpoints").glob(".*"))  # no staging folder left behind


def test_reward_model_under_fsdp_follows_one_process(tmp_path, reviews):
    runs = {}
    for nproc, extra in ((1, []), (2, ["--train.parallel", "fsdp"])):
        done = launch("rm", common(reviews, tmp_path / f"np{nproc}", "--train.max_steps", "3", *extra), nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = only_run(tmp_path / f"np{nproc}")
    one, two = (scalars(runs[n], "loss/train") for n in (1, 2))
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)


def test_a_sharded_checkpoint_resumes_in_one_process(tmp_path, sft_runs):
    run = resume_copy(sft_runs[2], tmp_path)
    done = launch("sft", ["--resume", str(run)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_diff(weights(run), weights(sft_runs[1])) <= 1e-5


def test_a_one_process_checkpoint_resumes_sharded_on_two(tmp_path, sft_runs):
    run = resume_copy(sft_runs[1], tmp_path)
    done = launch("sft", ["--resume", str(run), "--train.parallel", "fsdp"], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_diff(weights(run), weights(sft_runs[1])) <= 1e-5
    assert (latest_checkpoint(run / "checkpoints") / "optimizer" / ".metadata").is_file()


def fake_run(cfg, dtype=torch.float32):
    """A Run as rank 0 of 2 sees it, without a process group: forward_fn's checks come first."""
    return stage_common.Run(None, "sft", cfg, torch.device("cpu"), dtype, world=World(0, 2))


def test_fsdp_refuses_lora_fp16_and_compile():
    from gpt2rlhf.model import GPT, GPTConfig
    from gpt2rlhf.lora import LoraConfig, apply_lora

    base = ["--model.n_layer", "1", "--train.parallel", "fsdp"]
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=1, n_embd=8))
    lora = apply_lora(GPT(model.config), LoraConfig(r=2, targets=("attn.c_attn",)))
    cases = [(lora, [], torch.float32, "LoRA run"), (model, [], torch.float16, "bf16 or fp32"),
             (model, ["--train.compile", "true"], torch.float32, "train.compile")]
    for m, extra, dtype, words in cases:
        with pytest.raises(ConfigError, match=words):
            stage_common.forward_fn(m, fake_run(load_config(SFTConfig, overrides=base + extra), dtype))
    with pytest.raises(ConfigError, match="ddp or fsdp"):
        load_config(SFTConfig, overrides=["--model.n_layer", "1", "--train.parallel", "zero3"])


def test_ppo_refuses_fsdp(tmp_path, monkeypatch):
    from test_ppo import small_cfg

    from gpt2rlhf.stages import ppo

    monkeypatch.setattr(ppo, "open_run", lambda cfg, stage, resume=None: fake_run(cfg))
    cfg = small_cfg(tmp_path, "--train.parallel", "fsdp")
    assert isinstance(cfg, PPOConfig)
    with pytest.raises(ConfigError, match="PPO runs its models with ddp"):
        ppo.PPOLab(cfg, reward_fn=lambda texts: [0.0] * len(texts), prompts=[[1, 2]] * 64)
