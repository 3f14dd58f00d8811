"""Issue 11, fix 1: every log-prob that PPO and evaluate.py score comes from the
distribution the tokens were sampled from. Sampling forbids EOS before min_new_tokens,
so two models that differ only in their EOS logit sample identically there, and the KL
between them must be exactly 0 (it was about -7 nats per response in PPO and -250 in
evaluate.py when the log-probs were taken from the unmasked logits)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from gpt2rlhf.model import GPT, GPTConfig
from gpt2rlhf.tokenizer import EOT_TOKEN

SRC = Path(__file__).resolve().parents[1] / "src"


def eos_twins(config, seed=0, shift=30.0):
    """Two GPT-2s identical except for the EOS logit (an untied LM head whose EOS row differs)."""
    torch.manual_seed(seed)
    a = GPT(config)
    a.untie_lm_head()
    b = GPT(a.config)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        # a layer-normed hidden state has mean 0: a random direction moves the EOS logit
        b.lm_head.weight[EOT_TOKEN] += shift * torch.randn(config.n_embd) / config.n_embd ** 0.5
    return a.eval(), b.eval()


def test_evaluate_kl_is_zero_between_models_that_differ_only_where_eos_is_forbidden(tmp_path):
    from gpt2rlhf.hf import export_hf

    config = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)
    a, b = eos_twins(config)
    export_hf(a, tmp_path / "a")
    export_hf(b, tmp_path / "b")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"The film number {i} was"}) + "\n" for i in range(8)))
    out = tmp_path / "eval"
    res = subprocess.run([sys.executable, "evaluate.py", "-m", str(tmp_path / "a"), "-m", str(tmp_path / "b"),
                          "--names", "a,b", "--prompts", str(prompts), "--num-prompts", "8", "--min-new-tokens", "6",
                          "--max-new-tokens", "6", "--no-judge", "--samples", "0", "--out", str(out),
                          "--device", "cpu"], cwd=SRC, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    print({n: m["kl_to_reference"] for n, m in metrics.items()})
    assert metrics["a"]["kl_to_reference"] == 0.0
    assert metrics["b"]["kl_to_reference"] == 0.0
    assert metrics["a"]["reference_perplexity"] == metrics["b"]["reference_perplexity"]
