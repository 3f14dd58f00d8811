"""Review of 1ad9517 (PPOLab, --reward module:function): one test per finding, each stating
the expected behaviour in its docstring (all failed on 1ad9517 but the last, a guard).
Tiny models, one or two iterations each."""

import sys
import textwrap

import pytest
import torch
from test_ppo import dollar_share, prompts, small_cfg

from gpt2rlhf.rewards import RewardFunction, is_reward_spec, load_reward_function
from gpt2rlhf.stages import ppo
from gpt2rlhf.stages.common import RewardError
from gpt2rlhf.stages.ppo import PPOLab, Rollouts, callable_reward
from gpt2rlhf.tokenizer import get_tokenizer

FAST = ("--train.max_steps", "3", "--ppo.normalize_reward", "false", "--ppo.sample_every", "0")


def lab_of(tmp_path, *extra) -> PPOLab:
    return PPOLab(small_cfg(tmp_path, *FAST, *extra), reward_fn=dollar_share, prompts=prompts())


def up_to(lab: PPOLab, last: str):
    """The phases of one iteration, in order, up to and including `last`."""
    for phase in ("sample_prompts", "rollout", "score", "logprobs_and_values", "advantages", "update", "log"):
        getattr(lab, phase)()
        if phase == last:
            return


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ 1. the inspector's ratio (bug)

def test_saved_rollout_ratios_use_the_runs_autocast(tmp_path):
    """PPOLab.save_rollouts computes the ratio with ppo.ratios() outside
    run.autocast(), while the rollout log-probs were taken under it: in a bf16 run (the
    default on CUDA) every saved ratio is off by the bf16-vs-fp32 difference. Expected:
    saved before any update, every ratio on a real token is exactly 1 (as lab.ratios() is);
    after the update the saved ratios are those lab.ratios() gives."""
    with lab_of(tmp_path, "--train.dtype", "bf16") as lab:
        assert lab.run.dtype == torch.bfloat16
        lab.open()
        up_to(lab, "advantages")
        mask = lab.rollouts.response_mask.float()
        assert torch.equal(lab.ratios(), mask)  # the lab's own ratios: under autocast, exactly 1
        record = torch.load(lab.save_rollouts(1), weights_only=True)
        for row in record["rows"]:
            assert torch.equal(row["ratio"], torch.ones_like(row["ratio"])), row["ratio"]
        lab.update()
        after = lab.ratios()
        record = torch.load(lab.save_rollouts(1), weights_only=True)
        for i, row in enumerate(record["rows"]):
            assert torch.allclose(row["ratio"], after[i, :len(row["ratio"])], atol=1e-5, rtol=0), i


# ------------------------------------------------------------------ 2. phases on stale data (bug / risk)

def test_no_phase_reruns_the_finished_iteration_after_log(tmp_path):
    """After log() the iteration is done (lab.iteration moved on) but lab.rollouts,
    lab.logs and lab.query are still the finished iteration's, and the guards only check
    that a field is set: lab.update() then lab.log() silently trains a second time on the
    old batch and logs it as the next iteration (beta adapted again from the old KL; no
    time/generation), and lab.rollout() fails with a bare KeyError('generation').
    Expected: every phase but sample_prompts() refuses with "call lab.sample_prompts()
    first" until the next iteration starts; the finished rollouts stay readable and
    lab.ratios() still works."""
    with lab_of(tmp_path) as lab:
        lab.step()
        before = weights(lab.actor)
        for phase in ("update", "score", "logprobs_and_values", "advantages", "rollout", "log"):
            with pytest.raises(RuntimeError, match=r"sample_prompts"):
                getattr(lab, phase)()
        assert same(before, weights(lab.actor)) and lab.iteration == 1
        assert lab.rollouts.advantages is not None  # still readable
        lab.ratios()
        lab.step()  # and the next iteration runs normally
        assert lab.iteration == 2


def test_after_update_the_rollout_policy_logprobs_are_not_recomputed(tmp_path):
    """After update(), logprobs_and_values() is accepted and replaces
    rollouts.logprobs, the behaviour policy's log-probs that the clipped ratio is taken
    against, with the updated policy's; update() again runs ppo_epochs more optimizer steps
    (the LR schedule was sized for one update per iteration) and overwrites the logged
    update statistics. Expected: after update() only ratios() and log() run (a RuntimeError
    otherwise) and the weights do not move."""
    with lab_of(tmp_path) as lab:
        up_to(lab, "update")
        logprobs, moved = lab.rollouts.logprobs.clone(), weights(lab.actor)
        with pytest.raises(RuntimeError):
            lab.logprobs_and_values()
        assert torch.equal(lab.rollouts.logprobs, logprobs)
        with pytest.raises(RuntimeError):
            lab.update()
        assert same(moved, weights(lab.actor))
        lab.ratios()
        lab.log()


def test_save_in_the_middle_of_an_iteration_is_refused(tmp_path):
    """save() docstring: "PPOLab(cfg, resume=run folder) ... continues from
    it exactly". Called after update() but before log(), it checkpoints the updated weights
    under the previous iteration's number (and RNG state after this iteration's sampling):
    a resume redoes the iteration on already-updated weights. Expected: save() between
    sample_prompts() and log() raises RuntimeError; after log() it saves."""
    with lab_of(tmp_path) as lab:
        up_to(lab, "update")
        with pytest.raises(RuntimeError):
            lab.save()
        assert not list((lab.run.dir / "checkpoints").glob("step_*")) if lab.run.dir else True
        lab.log()
        assert lab.save().name == "step_00000001"


# ------------------------------------------------------------------ 3. from_checkpoints(resume=...) (risk)

def test_from_checkpoints_resume_keeps_the_runs_config(tmp_path):
    """train_ppo.py --resume reads the run's config.yaml and lays the
    command line over it; PPOLab.from_checkpoints(..., resume=run) builds a config from its
    arguments alone, so a setting the first call made (here ppo.clip_range 0.3) silently
    reverts to the default on resume, and the "continues exactly" promise breaks.
    Expected: the resumed lab's config is the run's saved config with `overrides` on top."""
    from test_ppo import small_checkpoints

    actor, critic = small_checkpoints(tmp_path)
    base = {"run.out_dir": tmp_path / "runs", "train.batch_size": 8, "ppo.mini_batch_size": 4,
            "ppo.max_new_tokens": 6, "ppo.normalize_reward": False, "prompts.max_tokens": 4, "train.max_steps": 2}
    texts = ["!", "#", "&", "%"] * 4
    with PPOLab.from_checkpoints(actor, critic, reward=dollar_share, prompts=texts,
                                 overrides={**base, "ppo.clip_range": 0.3}) as lab:
        lab.step()
        lab.save()
        run_dir = lab.run.dir
    with PPOLab.from_checkpoints(actor, critic, reward=dollar_share, prompts=texts, overrides=base,
                                 resume=run_dir) as resumed:
        assert resumed.iteration == 1
        assert resumed.cfg.ppo.clip_range == 0.3


# ------------------------------------------------------------------ 4. reward functions (nits)

def one_row() -> Rollouts:
    return Rollouts(torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.long), torch.tensor([[2, 3]]),
                    torch.ones(1, 2, dtype=torch.long))


def test_a_reward_with_positional_only_prompts_is_accepted():
    """fn(texts, prompts, /) is refused as a "wrong signature": "prompts"
    is in the parameters, so RewardFunction binds it by keyword, which a positional-only
    parameter refuses. Expected: it is called as fn(texts, prompts)."""
    def positional_only(texts, prompts, /):
        return [float(len(p)) for p in prompts]

    assert RewardFunction(positional_only, "positional_only")(["a", "b"], ["p", "qq"]) == [1.0, 2.0]


def test_a_reward_error_is_one_line_even_for_a_multi_line_message():
    """The commit promises every reward-function failure as one line (the
    CLI prints str(e) after "error: "), but an exception whose message has several lines (a
    Hugging Face pipeline's, a pandas error) is copied as is. Expected: no newline in the
    RewardError's message; the first line of the original is kept (the cause stays chained)."""
    def raises(texts):
        raise ValueError("first line\nsecond line\nthird line")

    with pytest.raises(RewardError) as e:
        callable_reward(raises, get_tokenizer(), "raises")(one_row())
    assert "\n" not in str(e.value) and "first line" in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)


def test_a_reward_returning_none_says_returned_not_raised():
    """list(fn(...)) sits inside the try that wraps the user's exceptions, so
    a function that returns None (a forgotten return) is reported as "raised TypeError:
    'NoneType' object is not iterable". Expected: the message says what it returned."""
    def forgot_return(texts):
        [len(t) for t in texts]

    with pytest.raises(RewardError) as e:
        callable_reward(forgot_return, get_tokenizer(), "forgot_return")(one_row())
    assert "returned" in str(e.value) and "raised" not in str(e.value), str(e.value)


def test_a_module_spec_is_found_in_the_working_folder(tmp_path, monkeypatch):
    """`--reward my_rewards:score` from the folder holding my_rewards.py:
    training/train_ppo.py puts src/training and src on sys.path, not the working folder, so
    only installed modules can be named (the same for the gpt2rlhf-ppo entry point).
    Expected: a module in the working folder is importable by name (as uvicorn's
    module:app), so module:function works for the user's own files."""
    (tmp_path / "review_lab_cwd_rewards.py").write_text(textwrap.dedent("""
        def score(texts):
            return [1.0 for _ in texts]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "review_lab_cwd_rewards", raising=False)
    assert load_reward_function("review_lab_cwd_rewards:score")(["a"]) == [1.0]


def test_a_reward_file_can_import_its_sibling_module(tmp_path, monkeypatch):
    """load_reward_function execs path/to/file.py from its location but
    leaves path/to off sys.path, so a reward file that imports a helper beside it
    (`from helpers import clean`) fails with ModuleNotFoundError, unlike `python file.py`.
    Expected: the file's folder is importable while (and after) it loads."""
    folder = tmp_path / "my_rewards"
    folder.mkdir()
    (folder / "review_lab_helpers.py").write_text("def clean(t):\n    return t.strip()\n")
    (folder / "main.py").write_text(textwrap.dedent("""
        from review_lab_helpers import clean

        def score(texts):
            return [float(len(clean(t))) for t in texts]
    """))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(folder)])
    monkeypatch.delitem(sys.modules, "review_lab_helpers", raising=False)
    assert load_reward_function(f"{folder / 'main.py'}:score")([" ab "]) == [2.0]


def test_windows_file_specs_are_specs():
    """The target may not contain ':', so
    C:\\rewards\\mine.py:score is taken for a checkpoint path, although load_reward_function
    (rpartition) would load it. Expected: a drive-letter .py path then :function is a spec."""
    assert is_reward_spec("C:\\rewards\\mine.py:score")
    assert is_reward_spec("D:/rewards/mine.py:score")
    assert not is_reward_spec("C:\\models\\rm")


def test_an_existing_checkpoint_folder_with_a_colon_is_not_a_spec(tmp_path, monkeypatch):
    """`rm:v2` looks like module:function, so an existing reward-model
    folder of that name can no longer be given to --reward (cannot import module rm).
    Expected: a value naming an existing path is a checkpoint, not a function."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rm:v2").mkdir()
    assert not is_reward_spec("rm:v2")
    assert is_reward_spec("gpt2rlhf.rewards:sentiment")


# ------------------------------------------------------------------ checked and correct: guards

def test_guard_an_error_mid_run_closes_the_tracker_without_done(tmp_path):
    """train()'s `with PPOLab(...)` hands the exception to tracked()'s __exit__ by
    hand: TensorBoard and the bar are closed, log.txt has the header but no "done"."""
    calls = []

    def fails_on_iteration_2(texts):
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("boom")
        return dollar_share(texts)

    cfg = small_cfg(tmp_path, *FAST)
    with pytest.raises(RewardError, match="boom"):
        ppo.train(cfg, reward_fn=fails_on_iteration_2, prompts=prompts())
    (run,) = (tmp_path / "runs").iterdir()
    log = (run / "log.txt").read_text()
    assert "run folder:" in log and "done:" not in log
