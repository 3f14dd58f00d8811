"""LoRA through loralib: equal at init, explicit merge only, trainable counts, heads train."""

import json

import pytest
import torch

from gpt2rlhf.lora import (LoraConfig, adapters_disabled, apply_lora, expected_trainable_params,
                           load_lora, lora_layers, merge_lora, save_lora)
from gpt2rlhf.model import GPT, GPTScalar


def randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


ALL = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")


@pytest.mark.parametrize("targets", [("attn.c_attn",), ("attn.c_attn", "mlp.c_proj"), ALL])
def test_lora_model_equals_base_at_init(tiny_model, targets):
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        base = tiny_model(ids)
        apply_lora(tiny_model, LoraConfig(r=4, targets=targets))
        assert len(lora_layers(tiny_model)) == sum(2 if t != "lm_head" else 1 for t in targets)
        assert torch.equal(tiny_model(ids), base)


def test_merged_and_unmerged_outputs_agree_and_merge_is_explicit(tiny_model):
    apply_lora(tiny_model, LoraConfig(r=4, alpha=8, targets=ALL))
    randomise_adapters(tiny_model)
    ids = torch.randint(0, 97, (2, 9))
    weights = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.no_grad():
        unmerged = tiny_model(ids)
        tiny_model.train()
        tiny_model.eval()  # loralib would merge here by default; ours must not
        assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in weights.items())
        assert torch.equal(tiny_model(ids), unmerged)
        embeddings = tiny_model.transformer.wte.weight.clone()
        merge_lora(tiny_model)
        assert not lora_layers(tiny_model)
        assert torch.allclose(tiny_model(ids), unmerged, atol=1e-5)
        # the LM head's adapter went into an untied copy, not into the input embeddings
        assert torch.equal(tiny_model.transformer.wte.weight, embeddings)
        assert not tiny_model.config.tie_word_embeddings


def test_adapters_disabled_gives_the_base_model(tiny_model):
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        base = tiny_model(ids)
        apply_lora(tiny_model, LoraConfig(r=4))
        randomise_adapters(tiny_model)
        assert not torch.allclose(tiny_model(ids), base)
        with adapters_disabled(tiny_model):
            assert torch.equal(tiny_model(ids), base)
        assert not torch.allclose(tiny_model(ids), base)


@pytest.mark.parametrize("targets", [("attn.c_attn",), ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), ALL])
def test_trainable_parameter_count_is_what_the_config_implies(tiny_config, targets):
    cfg = LoraConfig(r=4, targets=targets)
    lm = apply_lora(GPT(tiny_config), cfg)
    rm = apply_lora(GPTScalar(tiny_config), cfg)
    C, L, V, r = tiny_config.n_embd, tiny_config.n_layer, tiny_config.vocab_size, 4
    sizes = {"attn.c_attn": C + 3 * C, "attn.c_proj": 2 * C, "mlp.c_fc": 5 * C, "mlp.c_proj": 5 * C}
    adapters = sum(r * sizes[t] * L for t in targets if t in sizes)
    assert n_trainable(lm) == adapters + (r * (C + V) if "lm_head" in targets else 0)
    assert n_trainable(lm) == expected_trainable_params(lm, cfg)
    # the scalar head (C weights + 1 bias) trains too; no lm_head in a scalar model
    assert n_trainable(rm) == adapters + C + 1 == expected_trainable_params(rm, cfg)


def test_the_reward_head_really_trains(tiny_config):
    torch.manual_seed(0)
    rm = apply_lora(GPTScalar(tiny_config), LoraConfig(r=4))
    head = rm.score.weight.clone()
    frozen = rm.transformer.h[0].attn.c_attn.weight.clone()
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (4, 8))
    rm.score_last(ids).sum().backward()
    opt.step()
    assert rm.score.weight.grad is not None and not torch.equal(rm.score.weight, head)
    assert torch.equal(rm.transformer.h[0].attn.c_attn.weight, frozen)


def test_lora_weights_save_and_load_alone(tiny_config, tmp_path):
    cfg = LoraConfig(r=2)
    torch.manual_seed(0)
    a = apply_lora(GPTScalar(tiny_config), cfg)
    randomise_adapters(a)
    save_lora(a, cfg, tmp_path / "lora.safetensors")
    torch.manual_seed(0)  # same base weights, fresh adapters and head
    b = apply_lora(GPTScalar(tiny_config), cfg)
    with torch.no_grad():
        b.score.weight.zero_()
    load_lora(b, cfg, tmp_path / "lora.safetensors")
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    other = apply_lora(GPTScalar(tiny_config), LoraConfig(r=3))
    with pytest.raises(ValueError, match=r"lora\.safetensors: LoRA weights do not fit"):
        load_lora(other, LoraConfig(r=3), tmp_path / "lora.safetensors")


def test_bad_lora_config_names_the_field():
    with pytest.raises(ValueError, match=r"LoraConfig.targets: unknown \['attn.q_proj'\]"):
        LoraConfig(r=4, targets=("attn.q_proj",))
    with pytest.raises(ValueError, match=r"LoraConfig.r"):
        LoraConfig(r=-1)


def test_r_zero_means_no_adapters(tiny_model):
    apply_lora(tiny_model, LoraConfig(r=0))
    assert not lora_layers(tiny_model)
    assert n_trainable(tiny_model) == tiny_model.num_params(non_embedding=False)


@pytest.mark.parametrize("targets", [ALL, ("attn.c_attn", "mlp.c_proj")])
def test_export_hf_writes_what_the_lora_model_computes(tiny_model, tmp_path, targets):
    """An adapter on a tied LM head makes the head differ from the embeddings: the export
    must be untied (else transformers re-ties the head to wte and drops the adapter);
    without one, the export stays tied. transformers and our loader give our logits."""
    from transformers import GPT2LMHeadModel

    from gpt2rlhf.hf import export_hf, from_pretrained

    apply_lora(tiny_model, LoraConfig(r=4, alpha=8, targets=targets))
    randomise_adapters(tiny_model)
    with torch.no_grad():
        for _, layer in lora_layers(tiny_model):  # lora_A is random at init; make the deltas large
            layer.lora_B.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    out = export_hf(tiny_model, tmp_path / "export")
    assert tiny_model.config.tie_word_embeddings and lora_layers(tiny_model)  # the model itself is unchanged
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = tiny_model(ids)
        theirs = GPT2LMHeadModel.from_pretrained(out).eval()(ids).logits
        back = from_pretrained(out).eval()(ids)
    assert (theirs - ours).abs().max() < 1e-4
    assert (back - ours).abs().max() < 1e-4
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is ("lm_head" not in targets)
