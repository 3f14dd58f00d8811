"""Review of commit 35172ef (PPO under torchrun), on CPU with gloo.

One torchrun launch (2 processes) drives three PPOLabs in turn, each rank writing what
it saw; the tests compare that with one process running the same config in this pytest
process:

  A. deterministic rollouts (generation.sample patched to argmax), one minibatch per
     epoch, micro-batches of 2 rows (DDP no_sync accumulation), LoRA actor (reference =
     adapters off; DDP around ResponseLogits with frozen base weights), entropy bonus and
     whitened rewards: the 2-process update must be the 1-process update (the gradient of
     the token-weighted mean over the global minibatch), and both ranks must hold the
     same weights;
  B. the real sampler: with the same seed and global batch, 2 processes should sample
     and train what 1 process does (the issue: "the same seed gives the same result as
     one process with the same global batch");
  C. a reward function that fails on rank 1 only: every rank should stop with the
     reward's own message (score() claims "checked over every rank's scores, so that
     every rank stops with the same message"), not rank 0 with a lost-peer error.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2rlhf import generation
from gpt2rlhf.checkpoint import save_checkpoint
from gpt2rlhf.config import PPOConfig, load_config
from gpt2rlhf.model import GPT, GPTConfig, GPTScalar
from gpt2rlhf.stages.ppo import PPOLab

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

HARNESS = r'''
import os, sys
sys.path.insert(0, {src!r}); sys.path.insert(0, {tests!r})
import torch
from gpt2rlhf import generation
from gpt2rlhf.config import PPOConfig, load_config
from gpt2rlhf.stages.ppo import PPOLab
from test_review_ppo_distributed import (overrides_a, overrides_b, overrides_c, fixed_prompts, vowel_share,
                                         argmax_sample, failing_on_rank_1)

out, lm, sft, rm = sys.argv[1:5]
rank = int(os.environ["RANK"])

labs = []  # kept alive: a lab's tracker, when garbage-collected, leaves the process group

def drive(lab, iterations):
    labs.append(lab)
    lab.open()
    logs, first = [], None
    while lab.iteration < iterations:
        logs.append({{k: v for k, v in lab.step().items() if not k.startswith("time/")}})
        if first is None:
            first = {{k: v for k, v in vars(lab.rollouts).items() if k in ("query", "query_mask", "response",
                                                                          "response_mask")}}
    return {{"logs": logs, "first": first, "actor": lab.actor.state_dict(), "critic": lab.critic.state_dict()}}

# A: deterministic rollouts (labs are never closed: closing leaves the process group)
original = generation.sample
generation.sample = argmax_sample
lab = PPOLab(load_config(PPOConfig, overrides=overrides_a(lm, rm, os.path.join(out, "a"))),
             reward_fn=vowel_share, prompts=fixed_prompts())
torch.save(drive(lab, 2), os.path.join(out, f"a_rank{{rank}}.pt"))
generation.sample = original

# B: the real sampler
lab = PPOLab(load_config(PPOConfig, overrides=overrides_b(sft, rm, os.path.join(out, "b"))),
             reward_fn=vowel_share, prompts=fixed_prompts())
torch.save(drive(lab, 2), os.path.join(out, f"b_rank{{rank}}.pt"))

# C: a reward that fails on rank 1 only; each rank records what stopped it, then leaves
lab = PPOLab(load_config(PPOConfig, overrides=overrides_c(sft, rm, os.path.join(out, "c"))),
             reward_fn=failing_on_rank_1, prompts=fixed_prompts())
labs.append(lab)
lab.open()
try:
    lab.step()
    seen = None
except Exception as e:
    seen = (type(e).__name__, str(e))
torch.save(seen, os.path.join(out, f"c_rank{{rank}}.pt"))
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''


# ------------------------------------------------------------------ shared with the harness

def vowel_share(texts):
    return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts]


def failing_on_rank_1(texts):
    if os.environ.get("RANK") == "1":
        return [float("nan")] * len(texts)
    return vowel_share(texts)


def argmax_sample(probs, generator=None, rows=None):
    return probs.argmax(-1)


def fixed_prompts(n=32, seed=0):
    """Prompts of one length (3 tokens): one process and two pad them alike."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (3,), generator=g).tolist() for _ in range(n)]


def common(actor, critic, out):
    return ["-a", actor, "-c", critic, "--run.out_dir", str(out), "--prompts.max_tokens", "4",
            "--train.device", "cpu", "--train.dtype", "fp32", "--train.dist_timeout", "60",
            "--ppo.sample_every", "0", "--train.save_every", "0", "--train.keep_checkpoints", "0"]


def overrides_a(actor, critic, out):
    return [*common(actor, critic, out), "-b", "8", "--ppo.mini_batch_size", "8", "--train.micro_batch_size", "2",
            "--ppo.ppo_epochs", "2", "--ppo.max_new_tokens", "5", "--ppo.normalization_samples", "8",
            "--ppo.entropy_coef", "0.01", "--ppo.whiten_rewards", "true", "--ppo.adaptive_kl", "true",
            "--lora.r", "2", "--lora.targets", "[attn.c_attn, mlp.c_fc]", "--optim.lr", "3e-3",
            "--critic_optim.lr", "3e-3", "--train.max_steps", "2"]


def overrides_b(actor, critic, out):
    return [*common(actor, critic, out), "-b", "8", "--ppo.mini_batch_size", "4", "--ppo.ppo_epochs", "1",
            "--ppo.max_new_tokens", "6", "--ppo.normalization_samples", "8", "--optim.lr", "3e-3",
            "--train.max_steps", "2"]


def overrides_c(actor, critic, out):
    return [*common(actor, critic, out), "-b", "8", "--ppo.mini_batch_size", "8", "--ppo.max_new_tokens", "4",
            "--ppo.normalize_reward", "false", "--train.max_steps", "1"]


# ------------------------------------------------------------------ fixtures

def checkpoints(tmp: Path) -> tuple[str, str, str]:
    """(a plain tiny LM with GPT-2's vocabulary, an EOS-prone one (EOS logit
    about 9 above the rest, untied head), a critic/reward model of the same size)."""
    config = GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(1)
    lm = GPT(config)
    lm.untie_lm_head()
    torch.manual_seed(0)
    sft = GPT(config)
    sft.untie_lm_head()
    with torch.no_grad():
        sft.transformer.ln_f.bias.zero_()[0] = 3.0
        sft.lm_head.weight[50256].zero_()[0] = 3.0
    a = save_checkpoint(tmp / "lm" / "step_00000001", {"model": lm})
    s = save_checkpoint(tmp / "sft" / "step_00000001", {"model": sft})
    c = save_checkpoint(tmp / "rm" / "step_00000001", {"model": GPTScalar(config, zero_init_head=True)})
    return str(a), str(s), str(c)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review_ppo2")
    lm, sft, rm = checkpoints(tmp)
    out = tmp / "out"
    out.mkdir()
    script = tmp / "harness.py"
    script.write_text(HARNESS.format(src=str(SRC), tests=str(TESTS)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out), lm, sft, rm], cwd=SRC, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"done": done, "out": out, "tmp": tmp, "lm": lm, "sft": sft, "rm": rm}


def result(launched, name: str):
    path = launched["out"] / name
    assert path.is_file(), f"{name} missing: {launched['done'].stderr[-4000:]}"
    return torch.load(path, weights_only=False)


def one_process(overrides: list[str], iterations: int) -> dict:
    cfg = load_config(PPOConfig, overrides=overrides)
    with PPOLab(cfg, reward_fn=vowel_share, prompts=fixed_prompts()) as lab:
        lab.open()
        logs, first = [], None
        while lab.iteration < iterations:
            logs.append({k: v for k, v in lab.step().items() if not k.startswith("time/")})
            if first is None:
                first = {k: v for k, v in vars(lab.rollouts).items()
                         if k in ("query", "query_mask", "response", "response_mask")}
        return {"logs": logs, "first": first, "actor": lab.actor.state_dict(), "critic": lab.critic.state_dict()}


def responses(*parts: dict) -> list[list[int]]:
    """The real tokens of each response, the parts' rows in order (rank 0's first)."""
    return [row[m.bool()].tolist() for r in parts for row, m in zip(r["response"], r["response_mask"])]


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------ tests

def test_two_process_update_is_the_one_process_update_of_the_global_minibatch(launched, monkeypatch):
    """Deterministic rollouts and one minibatch per epoch, so only the data-parallel
    arithmetic differs: Stepper's global token weights x world.size, DDP's average,
    no_sync accumulation, global whitening, the LoRA reference with adapters off."""
    a0, a1 = result(launched, "a_rank0.pt"), result(launched, "a_rank1.pt")
    for side in ("actor", "critic"):  # DDP keeps the ranks' weights identical
        assert all(torch.equal(a0[side][k], a1[side][k]) for k in a0[side]), side
    monkeypatch.setattr(generation, "sample", argmax_sample)
    one = one_process(overrides_a(launched["lm"], launched["rm"], launched["tmp"] / "one_a"), 2)
    assert responses(a0["first"], a1["first"]) == responses(one["first"])
    for it, (mine, theirs) in enumerate(zip(a0["logs"], one["logs"]), 1):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (it, key)
    for side in ("actor", "critic"):
        assert max_difference(a0[side], one[side]) < 1e-5, side


def test_two_processes_sample_and_train_what_one_process_does_with_the_same_seed(launched):
    """Issue: "the same seed gives the same result as one process with the same global
    batch". generation.sample draws one uniform per row and step, so each rank could draw
    the global batch's uniforms from the shared stream and keep its rows, and the update
    could shuffle the global batch and give each rank its share of each global minibatch.
    Instead ranks > 0 sample from seeds of their own (PPOLab.rank_seed) and every rank
    shuffles only its own rows (ppo_update), so 2 processes train another run."""
    b0, b1 = result(launched, "b_rank0.pt"), result(launched, "b_rank1.pt")
    one = one_process(overrides_b(launched["sft"], launched["rm"], launched["tmp"] / "one_b"), 2)
    assert responses(b0["first"], b1["first"]) == responses(one["first"])
    assert max_difference(b0["actor"], one["actor"]) < 1e-5


def test_a_reward_that_fails_on_one_rank_stops_every_rank_with_its_message(launched):
    """rank 1's reward function returns NaN: callable_reward raises RewardError on rank 1
    before score() gathers the scores, so rank 0 is left in the all_gather (gloo: a
    lost-peer RuntimeError; NCCL: blocked until the timeout or torchrun's kill)."""
    c0, c1 = result(launched, "c_rank0.pt"), result(launched, "c_rank1.pt")
    assert c1 is not None and c1[0] == "RewardError", c1
    assert c0 is not None and c0[0] == "RewardError", c0  # rank 0 names the reward, not a lost peer
    assert "non-finite" in c0[1], c0
