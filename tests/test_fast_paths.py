"""Issue 14: the changes that made a PPO iteration faster on CPU compute what the slower
code computed. Each fast path is checked against the plain one it replaced: exactly where
the arithmetic is the same, within float rounding where it is not (fused AdamW)."""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_ppo import SMALL, prompts
from test_ppo_trust import phases, small_models, steppers

from gpt2rlhf import allocator
from gpt2rlhf.config import OptimArgs, PPOArgs
from gpt2rlhf.model import GPT, GPTConfig
from gpt2rlhf.rl import entropy_from_logprobs, masked_mean, sampling_logits_, sampling_logprobs
from gpt2rlhf.stages import ppo
from gpt2rlhf.stages.common import make_optimizer

V = 300


def plain_sampling_logprobs(logits, temperature, eos, min_new):
    """The code before issue 14: a division even at temperature 1, and masked_fill's copy."""
    z = logits.float() / temperature
    if eos is not None and min_new > 0:
        forbid = torch.zeros(z.shape[-2:], dtype=torch.bool)
        forbid[:min_new, eos] = True
        z = z.masked_fill(forbid, torch.finfo(z.dtype).min)
    return F.log_softmax(z, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("eos,min_new", [(None, 0), (V - 1, 3), (5, 6)])
def test_in_place_sampling_logits_give_the_same_logprobs_and_gradients(temperature, eos, min_new):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, V, bias=False)
    hidden = torch.randn(4, 6, 16)
    tokens = torch.randint(0, V, (4, 6))
    weights = torch.randn(4, 6)
    results = []
    for fast in (False, True):
        head.zero_grad()
        logits = head(hidden)
        logp = (F.log_softmax(sampling_logits_(logits, temperature, eos, min_new), -1) if fast
                else plain_sampling_logprobs(logits, temperature, eos, min_new))
        lp = logp.gather(-1, tokens[..., None]).squeeze(-1)
        (lp * weights).sum().backward()
        results.append((lp.detach(), entropy_from_logprobs(logp).detach(), head.weight.grad.clone()))
    for plain, fast in zip(*results):
        assert torch.equal(plain, fast)
    if eos is not None:  # the forbidden logit got no gradient through its column at t < min_new
        assert torch.isfinite(results[1][1]).all()


def test_sampling_logprobs_leaves_its_input_alone_and_the_in_place_one_does_not():
    logits = torch.randn(2, 5, V)
    before = logits.clone()
    sampling_logprobs(logits, 1.0, V - 1, 3)
    sampling_logprobs(logits, 0.5, V - 1, 3)
    assert torch.equal(logits, before)
    out = sampling_logits_(logits, 1.0, V - 1, 3)
    assert out.data_ptr() == logits.data_ptr()  # in place, as documented: no copy of B x T x V
    assert (logits[:, :3, V - 1] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("frozen", [False, True])
def test_the_lm_head_on_a_slice_of_positions_is_one_mm(frozen):
    """A frozen head (the reference model, a LoRA actor, evaluation) on a slice of positions
    made matmul broadcast the weight over the batch (a bmm); now every head is one mm, and
    frozen or not gives the same logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    hidden = torch.randn(4, 12, 16)[:, 3:-1]
    trainable = model.fp32_logits(hidden)
    model.lm_head.weight.requires_grad_(not frozen)
    with torch.no_grad(), Ops() as ops:
        logits = model.fp32_logits(hidden)
    assert "mm" in ops.seen and "bmm" not in ops.seen, ops.seen
    assert torch.equal(logits, trainable)


def test_the_entropy_is_logged_once_per_iteration_from_the_rollout_policy(tmp_path):
    """objective/entropy is the mean per-token entropy of the policy the rollouts came from,
    taken while scoring (TRL's tag for it); the update computes policy/entropy only when it
    trains on it."""
    actor, critic = small_models()
    p = PPOArgs(max_new_tokens=6, mini_batch_size=8, ppo_epochs=1)
    r, _ = phases(actor, critic, p)
    with torch.no_grad():
        r2, stats = ppo.logprobs_and_values(r, actor, None, critic, p)
        ref = r2.ref_logprobs
        ids, mask = r.sequences()
        logp = F.log_softmax(actor.lm_head(actor.transformer(ids, attention_mask=mask)[:, r.query.size(1) - 1:-1]), -1)
    expected = masked_mean(entropy_from_logprobs(logp), r.response_mask)
    assert stats["objective/entropy"] == pytest.approx(float(expected), abs=1e-5)
    assert torch.equal(r2.logprobs, ref)  # the actor is its own reference before any update
    for coef in (0.0, 0.01):
        a, c = steppers(actor, critic, tmp_path)
        out = ppo.ppo_update(actor, critic, r2, PPOArgs(**{**vars(p), "entropy_coef": coef}), a, c, 8)
        assert ("policy/entropy" in out) == (coef > 0)
        assert "objective/entropy" not in out


def test_a_ppo_run_logs_the_rollout_entropy_and_the_tags_it_always_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_ppo import scalars, small_cfg

    run_dir = ppo.train(small_cfg(tmp_path, "--train.max_steps", "2"), prompts=prompts())
    entropy = scalars(run_dir, "objective/entropy")
    assert len(entropy) == 2 and all(0 < h <= torch.log(torch.tensor(float(SMALL.vocab_size))) for h in entropy)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # at entropy_coef 0 the update computes no entropy; kl_loss is the critic-free trainer's (GRPO's KL term)
    update_tags = set(ppo.UPDATE_TAGS) - {"policy/entropy", "policy/kl_loss"}
    assert update_tags <= tags and "policy/entropy" not in tags
    assert {"objective/kl", "objective/kl_k3", "objective/reward", "objective/raw_score", "objective/kl_coef",
            "time/generation", "time/scoring", "time/update"} <= tags


def test_scoring_holds_no_more_than_three_vocabulary_sized_tensors(monkeypatch):
    """The sampling logits are released once log_softmax has its output (it saves that,
    not its input): while the entropy is computed they are gone."""
    import weakref

    actor, critic = small_models()
    p = PPOArgs(max_new_tokens=6, mini_batch_size=8, ppo_epochs=1)
    r, _ = phases(actor, critic, p)
    heads, alive = [], []
    actor.lm_head.register_forward_hook(lambda mod, inp, out: heads.append(weakref.ref(out)))
    plain = ppo.entropy_from_logprobs

    def entropy(logp):
        alive.append(heads[-1]() is not None)
        return plain(logp)
    monkeypatch.setattr(ppo, "entropy_from_logprobs", entropy)
    with torch.no_grad():
        ppo.logprobs_and_values(r, actor, None, critic, p)
    assert alive == [False]


def test_adamw_is_fused_on_cpu_and_steps_like_the_for_loop():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())
    fused = make_optimizer(model, OptimArgs(lr=1e-2), torch.device("cpu"))
    assert fused.defaults["fused"] is True
    loop = make_optimizer(twin, OptimArgs(lr=1e-2), torch.device("meta"))  # neither cpu nor cuda: not fused
    assert not loop.defaults["fused"]
    x = torch.randint(0, V, (2, 8))
    for _ in range(3):
        for m, opt in ((model, fused), (twin, loop)):
            m(x).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    # rounding only: after 3 steps of up to lr = 1e-2 each, within a thousandth of one step
    # (measured: 5.7e-6 at most, on a parameter whose second moment is near Adam's eps)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert float((a - b).abs().max()) < 1e-5


def test_a_resumed_optimizer_runs_the_kernel_of_this_device(tmp_path):
    """Optimizer.load_state_dict takes the saved param_groups whole: a checkpoint saved
    with the for-loop AdamW (before this change, or on another device) must still step
    with the fused kernel here."""
    from test_ppo_trust import steppers as make

    torch.manual_seed(0)
    actor, critic = small_models()
    a, _ = make(actor, critic, tmp_path)
    state = a.state_dict()
    for g in state["optimizer"]["param_groups"]:
        g["fused"] = None
    b, _ = make(actor, critic, tmp_path)
    b.load_state_dict(state)
    assert all(g["fused"] is True for g in b.optimizer.param_groups)


def test_keep_freed_memory_once_per_process_and_opt_out():
    code = "from gpt2rlhf import allocator; print(allocator.keep_freed_memory(), allocator.keep_freed_memory())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert out.split() == [str(on_glibc)] * 2
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "GPT2RLHF_MALLOC": "default"}).stdout
    assert out.split() == ["False", "False"]


def test_a_cpu_run_keeps_freed_memory(tmp_path, monkeypatch):
    from gpt2rlhf.stages.common import open_run
    from test_ppo import small_cfg

    calls = []
    monkeypatch.setattr("gpt2rlhf.stages.common.keep_freed_memory", lambda: calls.append(1))
    open_run(small_cfg(tmp_path), "ppo")
    assert calls == [1]
    assert callable(allocator.keep_freed_memory)
