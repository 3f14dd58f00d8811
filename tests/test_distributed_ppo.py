"""PPO under torchrun, on CPU with gloo (issue 16): 2 processes roll out their shares of
each batch with responses of different lengths, take the same number of decode steps,
and log exactly the statistics that one process computes from the union of their
rollouts; each rank's advantages are its rows of the union's; a 2-process checkpoint
resumes in 1 process, which samples and trains what the 2 processes did.

The run is driven by HARNESS under torchrun: PPOLab phase by phase on each rank, which
saves what it saw after every iteration (its rollouts, the logged scalars, how many
decode steps it took and when its own rows had all ended)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import worker_traceback

from gpt2rlhf.checkpoint import latest_checkpoint, load_model, save_checkpoint
from gpt2rlhf.config import PPOConfig, load_config
from gpt2rlhf.data import left_pad
from gpt2rlhf.model import GPT, GPTConfig, GPTScalar
from gpt2rlhf.stages.ppo import PPOLab, Rollouts, advantages, iteration_stats, response_logprobs
from gpt2rlhf.tokenizer import EOT_TOKEN

SRC = Path(__file__).resolve().parents[1] / "src"
ITERATIONS = 3

HARNESS = '''
import os, sys
sys.path.insert(0, {src!r})
import torch
from gpt2rlhf import generation
from gpt2rlhf.config import PPOConfig, load_config
from gpt2rlhf.stages.ppo import PPOLab
sys.path.insert(0, {tests!r})
from test_distributed_ppo import overrides, prompts, vowel_share

out, actor, critic = sys.argv[1:4]
rank = int(os.environ["RANK"])
seen = {{}}
original = generation.generate
def counting(model, *args, **kwargs):
    # the decode steps this rank took, and the step after which its own rows had all ended
    ask = kwargs["all_finished"]
    def all_finished(finished):
        seen["steps"] = seen.get("steps", 0) + 1
        if bool(finished.all()) and "own_done" not in seen:
            seen["own_done"] = seen["steps"]
        return ask(finished)
    out = original(model, *args, **{{**kwargs, "all_finished": all_finished}})
    seen["width"] = out.tokens.size(1)
    return out
import gpt2rlhf.stages.ppo as ppo_module
ppo_module.generate = counting
cfg = load_config(PPOConfig, overrides=overrides(actor, critic, out))
with PPOLab(cfg, reward_fn=vowel_share, prompts=prompts()) as lab:
    lab.open()
    while lab.iteration < {iterations}:
        seen.clear()
        lab.step()
        r = lab.rollouts
        torch.save({{"rollouts": {{k: v for k, v in vars(r).items()}}, "logs": dict(lab.logs), "beta": lab.beta,
                    "seen": dict(seen), "world": lab.world.size, "rng": torch.get_rng_state()}},
                   os.path.join(out, f"rank{{rank}}_it{{lab.iteration}}.pt"))
'''


def vowel_share(texts):
    """Reward: the share of vowels in each response's text."""
    return [sum(c in "aeiou" for c in t) / max(len(t), 1) for t in texts]


def prompts(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def overrides(actor, critic, out):
    return ["-a", actor, "-c", critic, "--run.out_dir", str(out), "-b", "16", "--ppo.mini_batch_size", "8",
            "--ppo.max_new_tokens", "12", "--ppo.normalization_samples", "32", "--ppo.kl_coef", "0.05",
            "--ppo.adaptive_kl", "true", "--optim.lr", "3e-3", "--train.save_every", "2", "--train.max_steps",
            str(ITERATIONS), "--prompts.max_tokens", "4", "--train.device", "cpu", "--train.dtype", "fp32"]


def eos_prone_checkpoints(tmp_path: Path) -> tuple[str, str]:
    """A tiny GPT-2 with the real vocabulary whose EOS logit is about 9 +- 3 above the
    rest (so responses end after a few tokens, at lengths that vary with the context),
    and a critic of the same size."""
    config = GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    actor = GPT(config)
    actor.untie_lm_head()
    with torch.no_grad():
        actor.transformer.ln_f.bias.zero_()[0] = 3.0
        actor.lm_head.weight[EOT_TOKEN].zero_()[0] = 3.0
    a = save_checkpoint(tmp_path / "sft" / "step_00000001", {"model": actor})
    c = save_checkpoint(tmp_path / "rm" / "step_00000001", {"model": GPTScalar(config, zero_init_head=True)})
    return str(a), str(c)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo2")
    actor, critic = eos_prone_checkpoints(tmp)
    out = tmp / "runs"
    out.mkdir()
    script = tmp / "harness.py"
    script.write_text(HARNESS.format(src=str(SRC), tests=str(Path(__file__).parent), iterations=ITERATIONS))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out), actor, critic], cwd=SRC, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    seen = {(rank, it): torch.load(out / f"rank{rank}_it{it}.pt", weights_only=False)
            for rank in (0, 1) for it in range(1, ITERATIONS + 1)}
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return {"out": out, "run": run_dir, "seen": seen, "actor": actor, "critic": critic, "tmp": tmp}


def union(a: dict, b: dict) -> Rollouts:
    """The two ranks' rollouts as one batch (rank 0's rows first, as one process holds
    them), prompts left-padded again to one width."""
    ra, rb = a["rollouts"], b["rollouts"]
    prompts = [q[m.bool()].tolist() for r in (ra, rb) for q, m in zip(r["query"], r["query_mask"])]
    query, query_mask = left_pad(prompts, pad=EOT_TOKEN)
    fields = {k: torch.cat([ra[k], rb[k]]) for k in ra if k not in ("query", "query_mask")}
    return Rollouts(query, query_mask, **fields)


def test_ranks_take_the_same_decode_steps_with_responses_of_different_lengths(two_process_run):
    seen = two_process_run["seen"]
    early = 0
    for it in range(1, ITERATIONS + 1):
        a, b = seen[(0, it)], seen[(1, it)]
        assert a["world"] == b["world"] == 2
        assert a["seen"]["steps"] == b["seen"]["steps"]  # lockstep: no rank left waiting in a collective
        assert a["seen"]["width"] == b["seen"]["width"]
        lengths = [r["rollouts"]["response_mask"].sum(1) for r in (a, b)]
        assert all(len(set(x.tolist())) > 1 for x in lengths), lengths  # lengths vary within each rank
        print(f"iteration {it}: steps {a['seen']['steps']}, own rows ended after {a['seen'].get('own_done')} / "
              f"{b['seen'].get('own_done')}; longest {int(lengths[0].max())} / {int(lengths[1].max())}")
        # a rank whose rows had all ended kept stepping until the other's had
        early += any(s["seen"].get("own_done", 10 ** 6) < s["seen"]["steps"] for s in (a, b))
    assert early >= 1


def test_logged_statistics_are_those_of_the_union_of_the_ranks_batches(two_process_run):
    seen, p = two_process_run["seen"], load_config(PPOConfig, overrides=overrides("a", "c", "o")).ppo
    for it in range(1, ITERATIONS + 1):
        a, b = seen[(0, it)], seen[(1, it)]
        # every rank logs (and adapts beta from) the same global numbers; times are each rank's own
        assert {k: v for k, v in a["logs"].items() if not k.startswith("time/")} == \
            {k: v for k, v in b["logs"].items() if not k.startswith("time/")}
        logs, whole = a["logs"], union(a, b)
        _, stats = advantages(whole, whole.score, whole.ref_logprobs, a["beta"], p)
        stats.update(iteration_stats(whole, a["beta"], {}))
        for key, value in stats.items():
            if key.startswith("time/"):
                continue
            assert logs[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
        # each rank's advantages and returns are its own rows of the union's
        mine, _ = advantages(whole, whole.score, whole.ref_logprobs, a["beta"], p)
        n = a["rollouts"]["response"].size(0)
        for rank, part in ((0, a), (1, b)):
            for name in ("advantages", "returns", "kl", "rewards"):
                assert torch.allclose(part["rollouts"][name], getattr(mine, name)[rank * n:(rank + 1) * n],
                                      atol=1e-6), (rank, name)
    # the rollout entropy of iteration 1, from the starting actor over the union in one process
    first = union(seen[(0, 1)], seen[(1, 1)])
    actor = load_model(Path(two_process_run["actor"]), "model").eval()
    with torch.no_grad():
        _, entropy = response_logprobs(actor, first, p, with_entropy=True)
    mask = first.response_mask.float()
    assert seen[(0, 1)]["logs"]["objective/entropy"] == pytest.approx(float((entropy * mask).sum() / mask.sum()),
                                                                      rel=1e-5)


def test_a_two_process_ppo_checkpoint_resumes_in_one_process(two_process_run):
    run, seen = two_process_run["run"], two_process_run["seen"]
    assert latest_checkpoint(run / "checkpoints").name == f"step_{ITERATIONS:08d}"
    # the iteration-2 checkpoint, continued in one process
    resumed = two_process_run["tmp"] / "resumed"
    shutil.copytree(run, resumed / run.name)
    shutil.rmtree(resumed / run.name / "checkpoints" / f"step_{ITERATIONS:08d}")
    cfg = load_config(PPOConfig, overrides=overrides(two_process_run["actor"], two_process_run["critic"], resumed))
    saved = load_model(run / "checkpoints" / "step_00000002", "actor").state_dict()  # (building a model draws
    two = load_model(latest_checkpoint(run / "checkpoints"), "actor").state_dict()  # random numbers: before the lab)
    with PPOLab(cfg, resume=resumed / run.name, reward_fn=vowel_share, prompts=prompts()) as lab:
        assert lab.iteration == 2 and lab.world.size == 1
        start = {k: v.clone() for k, v in lab.actor.state_dict().items()}
        assert all(torch.equal(start[k], saved[k]) for k in saved)
        assert lab.kl_ctl.value == seen[(0, 3)]["beta"]  # the adaptive beta the 2 processes went on with
        # both ranks ended iteration 2 in the random state the checkpoint holds
        assert torch.equal(seen[(1, 2)]["rng"], seen[(0, 2)]["rng"])
        assert torch.equal(torch.get_rng_state(), seen[(0, 2)]["rng"])
        # the data position is global: one process takes the whole batch the two took together
        query, mask = lab.sample_prompts()
        both = union(seen[(0, 3)], seen[(1, 3)])
        assert [q[m.bool()].tolist() for q, m in zip(query, mask)] == \
            [q[m.bool()].tolist() for q, m in zip(both.query, both.query_mask)]
        # the same random state on every rank, each drawing the whole batch's numbers: one
        # process samples what the two sampled together, and trains to the same weights
        lab.rollout()
        assert torch.equal(lab.rollouts.response, both.response)
        for phase in ("score", "logprobs_and_values", "advantages", "update", "log"):
            getattr(lab, phase)()
        assert lab.iteration == ITERATIONS
        one = lab.actor.state_dict()
        assert max(float((one[k] - two[k]).abs().max()) for k in two) <= 1e-5
        assert any(not torch.equal(one[k], start[k]) for k in start)  # it trained


def test_a_minibatch_that_does_not_divide_among_the_processes_is_a_clear_error(tmp_path):
    actor, critic = eos_prone_checkpoints(tmp_path)
    script = tmp_path / "run.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(SRC)!r})\nfrom gpt2rlhf.stages.ppo import main\n"
                      f"main(sys.argv[1:])\n")
    args = [*overrides(actor, critic, tmp_path / "runs"), "--ppo.mini_batch_size", "5", "-b", "20"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], cwd=SRC, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "ppo.mini_batch_size (5) must be divisible by the number of processes (2)" in done.stderr, \
        done.stderr[-3000:]
    assert not worker_traceback(done.stderr), done.stderr[-3000:]
