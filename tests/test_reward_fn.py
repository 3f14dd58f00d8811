"""--reward module:function and --reward path/to/file.py:function: any Python function as
PPO's reward, from the command line; a bad one is one clear line naming it."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import write_reviews
from test_ppo import small_checkpoints

from gpt2rlhf.checkpoint import latest_checkpoint, load_trainer_state
from gpt2rlhf.config import ConfigError
from gpt2rlhf.model import GPTConfig
from gpt2rlhf.rewards import RewardFunction, is_reward_spec, load_reward_function

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC.parent
BIG_VOCAB = GPTConfig(block_size=48, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("reward_fn")
    actor, critic = small_checkpoints(base, BIG_VOCAB)
    data = write_reviews(base / "reviews.jsonl", n=40)
    return base, actor, critic, data


def ppo_args(setup, reward, out, *extra):
    base, actor, critic, data = setup
    return ["-a", actor, "-c", critic, "--reward", reward, "--data.train", data,
            "--data.eval_size", "4", "-b", "8", "--ppo.mini_batch_size", "4", "--ppo.max_new_tokens", "6",
            "--prompts.min_tokens", "2", "--prompts.max_tokens", "6", "--ppo.normalization_samples", "8",
            "--train.max_steps", "2", "--run.out_dir", str(out), *extra]


def ppo_cli(setup, reward, out, *extra, env=None):
    return subprocess.run([sys.executable, "training/train_ppo.py", *ppo_args(setup, reward, out, *extra)], cwd=SRC,
                          capture_output=True, text=True, timeout=300, env=env)


def test_specs_are_told_from_checkpoints():
    for spec in ("mod:fn", "pkg.mod:fn", "rewards.py:score", "../x/y.py:f", "/abs/r.py:f"):
        assert is_reward_spec(spec), spec
    for path in ("runs/rm_imdb_20261125-115500", "gpt2", "/models/rm", None, "", "a:b:c", "C:\\models\\rm",
                 "runs/x:y/z"):
        assert not is_reward_spec(path), path


def test_a_file_callable_end_to_end_with_prompts(setup, tmp_path):
    """--reward file.py:function from the command line: the function is given the response
    texts and, as it asks for them, the prompts; the run trains and pins the function."""
    calls = tmp_path / "calls.txt"
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(textwrap.dedent(f"""
        def length_target(texts, prompts):
            with open({str(calls)!r}, "a") as f:
                for t, p in zip(texts, prompts):
                    f.write(repr((p, t)) + "\\n")
            return [-abs(len(t) - 20) / 20 for t in texts]
    """))
    done = ppo_cli(setup, f"{reward_file}:length_target", tmp_path / "runs")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = calls.read_text().splitlines()
    assert len(lines) == 8 + 2 * 8  # normalisation batch, then two iterations of 8
    prompts = [eval(line)[0] for line in lines]
    assert all(p.strip() for p in prompts)  # real prompt texts, not placeholders
    (run,) = (tmp_path / "runs").iterdir()
    state = load_trainer_state(latest_checkpoint(run / "checkpoints"))
    assert state["sources"]["reward_fn"] == f"{reward_file.resolve()}:length_target"
    assert state["sources"]["reward"] is None
    assert "reward_fn" in (run / "log.txt").read_text()


def test_a_module_callable_end_to_end(setup, tmp_path):
    """--reward gpt2rlhf.rewards:sentiment, the project's own scikit-learn judge, fitted on
    the labelled reviews GPT2RLHF_SENTIMENT_TRAIN names."""
    base = setup[0]
    env = {**__import__("os").environ, "GPT2RLHF_SENTIMENT_TRAIN": write_reviews(tmp_path / "labelled.jsonl", n=60)}
    done = ppo_cli(setup, "gpt2rlhf.rewards:sentiment", tmp_path / "runs", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (tmp_path / "runs").iterdir()
    acc = EventAccumulator(str(run))
    acc.Reload()
    scores = [e.value for e in acc.Scalars("objective/raw_score")]
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)  # mean P(positive)
    assert base.exists()


BAD = {
    "import": ("no_such_module_xyz:f", r"reward no_such_module_xyz:f: cannot import module no_such_module_xyz"),
    "missing": ("gpt2rlhf.rewards:nope", r"reward gpt2rlhf.rewards:nope: gpt2rlhf.rewards has no nope"),
    "not callable": ("FILE:NUMBER", r"reward .*bad.py:NUMBER: .*NUMBER is a int, not a function"),
    "signature": ("FILE:no_args", r"reward .*bad.py:no_args: wrong signature \(\)"),
    "count": ("FILE:too_few", r"reward .*bad.py:too_few returned 1 scores for 8 responses"),
    "nan": ("FILE:nan", r"reward .*bad.py:nan returned non-finite scores for responses \[0, 1, 2, 3, 4\]"),
    "not a number": ("FILE:words", r"reward .*bad.py:words returned something that is not a number"),
    "raises": ("FILE:raises", r"reward .*bad.py:raises raised ZeroDivisionError: division by zero"),
    "no file": ("nowhere/r.py:f", r"reward nowhere/r.py:f: no file nowhere/r.py"),
    "file fails": ("BROKEN:f", r"reward .*broken.py:f: importing .*broken.py failed: NameError"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_callable_is_one_clear_line(setup, tmp_path, case, capsys):
    """Each case through the command line's own entry (ppo.main, in this process: a
    subprocess per case would cost seconds of torch import each); the import case also as a
    real subprocess."""
    (tmp_path / "bad.py").write_text(textwrap.dedent("""
        NUMBER = 3
        def no_args(): return []
        def too_few(texts): return [1.0]
        def nan(texts): return [float("nan")] * len(texts)
        def words(texts): return ["good"] * len(texts)
        def raises(texts): return [1 / 0 for _ in texts]
    """))
    (tmp_path / "broken.py").write_text("undefined_name + 1\n")
    spec, message = BAD[case]
    spec = spec.replace("FILE", str(tmp_path / "bad.py")).replace("BROKEN", str(tmp_path / "broken.py"))
    if case == "import":
        done = ppo_cli(setup, spec, tmp_path / "runs")
        code, stderr = done.returncode, done.stderr
    else:
        from gpt2rlhf.stages import ppo

        with pytest.raises(SystemExit) as exit_:
            ppo.main(ppo_args(setup, spec, tmp_path / "runs"))
        code, stderr = exit_.value.code, capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]  # not the progress bars
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    import re
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/checkpoints/step_*"))


def test_prompts_are_passed_by_name_or_position():
    seen = []

    def by_name(texts, *, prompts):
        seen.append(("name", prompts))
        return [0.0] * len(texts)

    def by_position(responses, queries):
        seen.append(("position", queries))
        return [0.0] * len(responses)

    def texts_only(texts, scale=1.0):
        seen.append(("none", scale))
        return [0.0] * len(texts)

    for fn in (by_name, by_position, texts_only):
        RewardFunction(fn, fn.__name__)(["a"], ["p"])
    assert seen == [("name", ["p"]), ("position", ["p"]), ("none", 1.0)]


def test_the_examples_file_loads_and_its_offline_rewards_work():
    """examples/rewards.py: the Hugging Face recipe (not run here: no hub) beside rewards
    that need nothing: they load through the same path the command line takes."""
    regex = load_reward_function(f"{ROOT / 'examples' / 'rewards.py'}:exclamations")
    assert regex(["great!!", "fine."]) == [2.0, 0.0]
    length = load_reward_function(f"{ROOT / 'examples' / 'rewards.py'}:length_target")
    assert length.with_prompts and length(["a " * 20, "a " * 10], ["p", "q"]) == [0.0, -0.5]
    hf = load_reward_function(f"{ROOT / 'examples' / 'rewards.py'}:hf_sentiment")
    assert hf.with_prompts is False
    with pytest.raises(ConfigError, match="wrong signature"):
        RewardFunction(lambda: [], "lambda")
