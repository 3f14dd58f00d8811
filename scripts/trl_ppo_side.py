"""The TRL side of scripts/bench_ppo_vs_trl.py: TRL 0.11's classic PPOTrainer on the task
the orchestrator wrote (a Hugging Face export of our SFT model, the prompt batches of every
iteration, the settings). Runs in its own virtual environment (TRL is never a dependency
of the project); imports nothing of the project but the reward in ppo_bench_task.py.

    .venv-trl/bin/python scripts/trl_ppo_side.py --task TASK.json --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_bench_task import reward  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    task = json.loads(Path(args.task).read_text())
    s = task["settings"]

    import transformers
    import trl
    from transformers import GPT2TokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    start = time.perf_counter()
    torch.manual_seed(task["seed"])
    hf = task["hf_dir"]
    tok = GPT2TokenizerFast(vocab_file=str(Path(hf) / "vocab.json"), merges_file=str(Path(hf) / "merges.txt"))
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLMWithValueHead.from_pretrained(hf)
    ref = AutoModelForCausalLMWithValueHead.from_pretrained(hf)
    config = PPOConfig(
        learning_rate=s["lr"], batch_size=s["batch_size"], mini_batch_size=s["mini_batch_size"],
        gradient_accumulation_steps=1, ppo_epochs=s["ppo_epochs"], init_kl_coef=s["kl_coef"],
        adap_kl_ctrl=s["adaptive_kl"], target=s["target_kl"], horizon=s["kl_horizon"], gamma=s["gamma"],
        lam=s["lam"], cliprange=s["clip_range"], cliprange_value=s["clip_range_value"], vf_coef=s["vf_coef"],
        seed=task["seed"], log_with=None)
    trainer = PPOTrainer(config, model, ref, tok)
    gen_kwargs = dict(min_new_tokens=s["min_new_tokens"], max_new_tokens=s["max_new_tokens"], do_sample=True,
                      top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.eos_token_id)
    loaded = time.perf_counter() - start
    rows = []
    for it, batch in enumerate(task["batches"]):
        queries = [torch.tensor(ids) for ids in batch]
        t0 = time.perf_counter()
        responses = trainer.generate(queries, return_prompt=False, batch_size=len(queries), **gen_kwargs)
        t1 = time.perf_counter()
        scores = reward(tok.batch_decode(responses))
        t2 = time.perf_counter()
        stats = trainer.step(queries, responses, [torch.tensor(x) for x in scores])
        t3 = time.perf_counter()
        rows.append({"iteration": it + 1, "reward": sum(scores) / len(scores), "kl": float(stats["objective/kl"]),
                     "response_length": sum(len(r) for r in responses) / len(responses),
                     "generation": t1 - t0, "reward_time": t2 - t1, "update": t3 - t2, "total": t3 - t0})
        print(f"trl {it + 1}: reward {rows[-1]['reward']:.3f} kl {rows[-1]['kl']:.3f} "
              f"gen {t1 - t0:.2f}s step {t3 - t2:.2f}s", flush=True)
    Path(args.out).write_text(json.dumps({
        "side": "trl", "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                    "torch": torch.__version__},
        "threads": torch.get_num_threads(), "load_seconds": loaded,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "iterations": rows}, indent=1))


if __name__ == "__main__":
    main()
