"""Configs: YAML + command line through jsonargparse, type checking, errors that name the key."""

import pytest

from gpt2rlhf.config import (PPOConfig, ConfigError, DPOConfig, RMConfig, SFTConfig, load_config, parse_cli,
                             save_config)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_command_line_with_short_flags(tmp_path):
    path = write(tmp_path, "model: {n_layer: 2, n_head: 2, n_embd: 32}\noptim: {lr: 1.0e-3}\nrun: {exp_name: y}\n")
    # --config last: the command line still wins over the file, wherever it stands
    yaml_path, overrides, resume = parse_cli(SFTConfig, ["-n", "exp", "-b", "8", "--optim.lr", "5e-4",
                                                         "--data.packing", "true", "--lora.targets",
                                                         "[attn.c_attn, mlp.c_fc]", "-p", "gpt2", "--config", path])
    cfg = load_config(SFTConfig, yaml_path, overrides)
    assert resume is None
    assert cfg.run.exp_name == "exp" and cfg.train.batch_size == 8 and cfg.model.pretrain == "gpt2"
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.packing is True and cfg.lora.targets == ("attn.c_attn", "mlp.c_fc")
    assert cfg.model.n_layer == 2


def test_long_flags_none_and_equals(tmp_path):
    cfg = load_config(PPOConfig, overrides=["--actor", "a", "--critic=c", "--exp-name", "x",
                                                            "--batch-size=8", "--reward", "none",
                                                            "--ppo.missing_eos_penalty", "None"])
    assert (cfg.actor.pretrain, cfg.critic.pretrain, cfg.run.exp_name, cfg.train.batch_size) == ("a", "c", "x", 8)
    assert cfg.reward is None and cfg.ppo.missing_eos_penalty is None
    assert load_config(SFTConfig, overrides=["--run.exp_name", "none"]).run.exp_name == "none"  # a str stays one


def test_resume_flag_with_and_without_a_folder():
    assert parse_cli(SFTConfig, ["--resume"])[2] == "latest"
    assert parse_cli(SFTConfig, ["--resume", "runs/sft_x", "-n", "x"])[2] == "runs/sft_x"
    assert parse_cli(SFTConfig, ["--resume", "-n", "x"])[2] == "latest"


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim.learning_rate'"):
        load_config(SFTConfig, overrides=["--optim.learning_rate", "1"])
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(SFTConfig, overrides=["--optim.lrr", "1"])
    with pytest.raises(ConfigError, match=r"unknown key 'max_step'; did you mean 'train.max_steps'"):
        load_config(SFTConfig, overrides=["--max_step", "1"])
    with pytest.raises(ConfigError, match=r"unknown key 'run.exp'; did you mean 'run.exp_name'"):
        parse_cli(SFTConfig, ["--run.exp", "x"])  # no abbreviations
    path = write(tmp_path, "train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError,
                       match=r"cfg\.yaml: unknown key 'train.batch_sise'; did you mean 'train.batch_size'"):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match=r"'ppo.vf_coef' was removed: .*critic_optim.lr"):
        parse_cli(PPOConfig, ["--ppo.vf_coef", "0.1"])


def test_mistyped_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: 'train.max_steps' expects int, got 'many'"):
        load_config(SFTConfig, overrides=["--train.max_steps", "many"])
    with pytest.raises(ConfigError, match=r"command line: 'data.max_examples' expects int or none, got 'x'"):
        parse_cli(SFTConfig, ["--data.max_examples", "x"])
    with pytest.raises(ConfigError, match=r"command line: --optim.lr needs a value"):
        parse_cli(SFTConfig, ["--optim.lr"])
    with pytest.raises(ConfigError, match=r"command line: --data.packing needs a value"):  # booleans: true/false
        parse_cli(SFTConfig, ["--data.packing"])
    path = write(tmp_path, "optim:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: 'optim.lr' expects float"):
        load_config(SFTConfig, path)
    path = write(tmp_path, "optim:\n  lr: null\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: 'optim.lr' expects float, got None"):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError,
                       match=r"train.batch_size \(10\) must be a positive multiple of train.micro_batch_size \(4\)"):
        load_config(SFTConfig, overrides=["-b", "10", "--train.micro_batch_size", "4"])
    with pytest.raises(ConfigError, match=r"data.format must be"):
        load_config(RMConfig, overrides={"data": {"format": "csv"}})


def test_a_derived_default_follows_the_yaml(tmp_path):
    """data.max_prompt_length unset is max_length // 2 of the max_length in force, not of the default's."""
    cfg = load_config(SFTConfig, write(tmp_path, "data:\n  max_length: 128\n"))
    assert cfg.data.max_prompt_length == 64
    assert load_config(SFTConfig, overrides=["--data.max_length", "32"]).data.max_prompt_length == 16


def test_broken_yaml_is_named(tmp_path):
    path = write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: not valid YAML"):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(SFTConfig, str(tmp_path / "nope.yaml"))


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(SFTConfig, overrides=["-n", "a", "--lora.r", "4", "--data.train", "x.jsonl"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SFTConfig, str(tmp_path / "config.yaml")) == cfg


def test_every_preset_loads():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))
    assert len(presets) >= 4
    for path in presets:
        cls = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "dpo": DPOConfig}.get(path.stem)
        if cls is None:
            continue
        overrides = {"model": {"pretrain": "gpt2"}} if path.stem in ("rm", "dpo") else None  # they need -p
        cfg = load_config(cls, str(path), overrides)
        assert cfg.run.exp_name in ("imdb", "hh")


def test_a_section_named_on_the_command_line_keeps_the_stages_own_defaults():
    """The hand-written parser rebuilt a section from its class's defaults as soon as any
    source named one of its keys: RM's optim.lr 1e-5 became 3e-4 (and weight decay 0.1)
    with --optim.warmup_steps 2, and PPO's -b reset train.max_steps to 1000."""
    from gpt2rlhf.config import PPOConfig, RMConfig

    rm = load_config(RMConfig, overrides=["-p", "x", "--optim.warmup_steps", "2"]).optim
    assert (rm.lr, rm.weight_decay, rm.warmup_steps) == (1e-5, 0.0, 2)
    ppo = load_config(PPOConfig, overrides=["-a", "x", "-c", "y", "-b", "8", "--optim.lr", "1e-3"])
    assert (ppo.train.batch_size, ppo.train.max_steps, ppo.train.log_every, ppo.train.save_every) == (8, 100, 1, 20)
    assert (ppo.optim.lr, ppo.optim.warmup_steps, ppo.optim.weight_decay) == (1e-3, 0, 0.0)
