"""The sampling entry point, run as a user would: a subprocess from src/."""

import subprocess
import sys
from pathlib import Path

from conftest import make_hf_folder

SRC = Path(__file__).resolve().parents[1] / "src"


def test_sample_from_a_hugging_face_folder(tmp_path):
    folder = tmp_path / "hf"
    make_hf_folder(folder, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)
    out = subprocess.run([sys.executable, "sample.py", "-p", str(folder), "--prompt", "Hello", "--prompt", "The movie",
                          "--max-new-tokens", "5", "--seed", "1", "--device", "cpu"], cwd=SRC, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--- sample 1" in out.stdout and "tokens/s) on cpu" in out.stdout


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "sample.py", "-p", str(tmp_path / "nope") + "/"], cwd=SRC,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "error:" in out.stderr and "nope" in out.stderr and "Traceback" not in out.stderr
