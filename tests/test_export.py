"""The export to the engines that serve and train at cluster scale (issue 16): a run
folder exported with src/export.py is a standard Hugging Face GPT2LMHeadModel folder with
GPT-2's tokenizer files, which transformers (and so vLLM, verl and OpenRLHF, which read
the same folder through transformers' config and tokenizer) loads with no hub access."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2rlhf.checkpoint import save_checkpoint, step_dir
from gpt2rlhf.lora import LoraConfig, apply_lora
from gpt2rlhf.model import GPT, GPTConfig, GPTScalar
from gpt2rlhf.tokenizer import EOT_TOKEN, get_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"
TEXT = "The film's ending was, frankly, a let-down 100%... but I'd watch it again! <|endoftext|>"


def export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export.py", *map(str, args)], cwd=SRC, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A PPO-style run folder (actor with LoRA adapters, critic) exported from the command line."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    actor = apply_lora(GPT(config), LoraConfig(r=4, targets=("attn.c_attn",)))
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # adapters that change the output, to be merged by the export
    run = tmp / "runs" / "ppo_x_20261206-000000"
    save_checkpoint(step_dir(run / "checkpoints", 3), {"actor": actor, "critic": GPTScalar(config)},
                    metadata={"stage": "ppo", "step": 3})
    done = export(run, tmp / "hf")
    assert done.returncode == 0, done.stderr
    return tmp / "hf", actor.eval()


def test_the_export_is_a_standard_gpt2_folder_with_its_tokenizer(exported):
    folder, _ = exported
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert config["eos_token_id"] == config["bos_token_id"] == EOT_TOKEN


def test_transformers_loads_the_model_and_tokenizer_offline(exported):
    transformers = pytest.importorskip("transformers")
    folder, actor = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([get_tokenizer().encode(TEXT, allowed_special="all")])
    with torch.no_grad():
        ours, theirs = actor(ids), model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())  # adapters merged
    for fast in (True, False):
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=fast)
        assert tok(TEXT)["input_ids"] == ids[0].tolist(), fast  # byte for byte tiktoken's encoding
        assert tok.eos_token_id == EOT_TOKEN and tok.model_max_length == 64
        assert tok.decode(ids[0]) == TEXT


def test_a_folder_that_is_not_empty_or_a_bad_source_is_one_error_line(tmp_path, exported):
    folder, _ = exported
    done = export(tmp_path / "missing_run", tmp_path / "out")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out").exists()
    done = export(folder, folder)
    assert done.returncode == 2 and "not an empty folder" in done.stderr, done.stderr
