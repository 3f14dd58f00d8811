import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the tests also run without `pip install -e .`

from gpt2rlhf.model import GPT, GPTConfig  # noqa: E402

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # several workers share the cores: cores / workers torch threads each, in the worker and in
    # the stages it starts (the same thread count in and out of process: a run resumed in a
    # subprocess then sums in the same order as the uninterrupted one, bit for bit)
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


@pytest.fixture
def tiny_config():
    return GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


def make_hf_folder(path: Path, vocab_size=101, n_layer=2, n_head=4, n_embd=64, n_positions=128,
                   initializer_range=0.02, seed=0):
    """A randomly initialised transformers GPT2LMHeadModel saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                     vocab_size=vocab_size, initializer_range=initializer_range,
                     bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture
def hf_folder(tmp_path):
    """(folder, transformers model) for a tiny random GPT-2."""
    folder = tmp_path / "hf_gpt2"
    return folder, make_hf_folder(folder)


def left_padded(batch_size=3, length=10, vocab_size=101, pads=(4, 2, 0), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


def write_reviews(path: Path, n: int = 48, seed: int = 0) -> str:
    """A small labelled-review JSON-lines file (IMDB's schema)."""
    import json
    import random

    rng = random.Random(seed)
    good = ["great", "wonderful", "superb", "moving", "brilliant", "fun"]
    bad = ["awful", "boring", "dull", "terrible", "weak", "painful"]
    rows = []
    for i in range(n):
        label = i % 2
        words = good if label else bad
        text = f"This film was {rng.choice(words)} and the acting was {rng.choice(words)}. " * rng.randint(1, 3)
        rows.append(json.dumps({"text": text.strip(), "label": label}))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


TINY_ARGS = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "64",
             "--data.max_length", "48", "--data.eval_size", "8", "-b", "4", "--train.log_every", "1",
             "--optim.warmup_steps", "2"]


def kill_after_checkpoint(cmd: list[str], cwd: Path, out: Path, step: int, timeout: float = 240) -> Path:
    """Start a training command, SIGKILL it as soon as checkpoint `step` exists under
    `out`, and return its run folder."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not list(out.glob(f"*/checkpoints/step_{step:08d}")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = out.iterdir()
    return run_dir
