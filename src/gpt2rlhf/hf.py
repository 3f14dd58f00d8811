"""Hugging Face GPT-2 checkpoints in and out, with no `transformers` import.

A Hugging Face GPT-2 folder holds `config.json` and `model.safetensors` (or
`pytorch_model.bin`, or shards with an index). Its attention and MLP weights are Conv1D,
stored (in, out); ours are nn.Linear, (out, in): those four are transposed both ways.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import CheckpointError, load_state_checked, read_json, read_safetensors
from .lora import merged_state_dict
from .model import GPT, MODEL_CLASSES, GPTConfig
from .tokenizer import bpe_files

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


def config_from_hf(hf: dict, source: Path, **overrides) -> GPTConfig:
    """Our GPTConfig from a Hugging Face GPT-2 config.json."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(
            f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt2'; only GPT-2 checkpoints can be loaded"
        )
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: activation_function {hf['activation_function']!r} is not GPT-2's gelu_new")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported")
    try:
        return GPTConfig(
            block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=hf.get("tie_word_embeddings", True), **overrides,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: field {e} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_weight_files(folder: Path) -> list[Path]:
    """The files read_hf_weights reads, in its order of preference (for a cache key)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [index] + [folder / s for s in sorted(set(read_json(index).get("weight_map", {}).values()))]
    return [folder / "pytorch_model.bin"] if (folder / "pytorch_model.bin").is_file() else []


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a Hugging Face folder, and the file they came from."""
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors"), folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(folder / shard))
        return tensors, index
    if (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        try:  # weights_only: never unpickle arbitrary objects
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch file ({e})") from None
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def hf_to_ours(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (OpenAI's original upload has no `transformer.` prefix), drop the attention
    bias buffers of old checkpoints, transpose Conv1D weights."""
    out = {}
    for k, v in tensors.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not k.startswith(("transformer.", "lm_head.", "score.")):
            k = "transformer." + k
        out[k] = v.t().contiguous() if k.endswith(CONV1D) else v
    return out


def download(name: str) -> Path:
    """A hub model's files, through huggingface_hub (which also reads its local cache)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES))
    except Exception as e:
        raise CheckpointError(
            f"could not get '{name}' from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            f"With no network, copy a Hugging Face GPT-2 folder (config.json + model.safetensors) "
            f"to this machine, e.g. `huggingface-cli download {name} --local-dir {name}` where there "
            f"is a network, and pass that folder's path instead of '{name}'."
        ) from None


def from_pretrained(name_or_path: str | Path, kind: str = "lm", new_head: bool = False, **overrides):
    """A GPT (kind "lm") or GPTScalar (kind "scalar") with the weights of a Hugging Face
    GPT-2: a local folder, or a hub name such as "gpt2-medium" when the network allows.
    A scalar model takes the folder's `score` head (GPT2ForSequenceClassification); from
    a folder without one, only when `new_head` asks for a new head on its backbone."""
    path = Path(name_or_path)
    folder = path if path.is_dir() else None
    if folder is None:
        if path.exists() or str(name_or_path).startswith((".", "/", "~")):
            raise CheckpointError(f"{name_or_path}: not a folder holding a Hugging Face checkpoint")
        folder = download(str(name_or_path))
    config = config_from_hf(read_json(folder / "config.json"), folder / "config.json", **overrides)
    tensors, source = read_hf_weights(folder)
    tensors = hf_to_ours(tensors)
    model = MODEL_CLASSES[kind](config)
    if kind == "scalar":
        tensors.pop("lm_head.weight", None)
        if "score.weight" in tensors and "score.bias" not in tensors:  # HF's score has no bias
            tensors["score.bias"] = torch.zeros(1)
    optional = ("lm_head.weight",) if config.tie_word_embeddings else ()
    if kind == "scalar" and "score.weight" not in tensors:
        if not new_head:
            raise CheckpointError(f"{source}: a language model without a score head, not a reward model")
        optional += ("score.weight", "score.bias")
    load_state_checked(model, tensors, source, optional)
    return model


def export_hf(model: GPT, folder: str | Path, tokenizer: bool = True):
    """Write `model` as a Hugging Face GPT2LMHeadModel folder (config.json +
    model.safetensors) that `transformers` loads unchanged. LoRA adapters are folded in
    (one on a tied LM head unties it in the export); the model itself is not modified.

    With `tokenizer` (and GPT-2's vocabulary), the folder also gets GPT-2's tokenizer
    files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) and
    generation_config.json: the standard folder that AutoTokenizer, vLLM, verl and
    OpenRLHF read, with no hub access."""
    if not isinstance(model, GPT):
        raise TypeError(f"export_hf writes language models (GPT), not {type(model).__name__}")
    if not model.config.bias:
        raise ValueError("export_hf: Hugging Face GPT-2 has biases; this model was built with bias=False")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    sd = merged_state_dict(model)
    # A LoRA adapter merged into a tied head makes it differ from wte: written tied,
    # transformers would re-tie it and drop the adapter, so such a head is written untied.
    tied = c.tie_word_embeddings and torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    if tied:
        sd.pop("lm_head.weight")  # transformers re-ties it from wte
    tensors = {k: (v.t() if k.endswith(CONV1D) else v).detach().to("cpu").contiguous() for k, v in sd.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    eot = 50256 if c.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if the vocabulary has it
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "layer_norm_epsilon": c.layer_norm_epsilon, "initializer_range": 0.02,
        "scale_attn_weights": True, "use_cache": True, "bos_token_id": eot, "eos_token_id": eot,
        "tie_word_embeddings": tied, "torch_dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
    }
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer and eot is not None:
        write_tokenizer(folder, c.block_size)
    return folder


def write_tokenizer(folder: Path, max_length: int):
    """GPT-2's tokenizer as Hugging Face writes it: vocab.json and merges.txt are the BPE
    files tiktoken uses (encoder.json, vocab.bpe) under their Hugging Face names; the
    end-of-text token is BOS, EOS and UNK, as in the hub's gpt2 folder."""
    files = bpe_files()
    shutil.copyfile(files["encoder.json"], folder / "vocab.json")
    shutil.copyfile(files["vocab.bpe"], folder / "merges.txt")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
              "add_bos_token": False, "clean_up_tokenization_spaces": False, **special}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special),
                          ("generation_config.json", {"bos_token_id": 50256, "eos_token_id": 50256})):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
