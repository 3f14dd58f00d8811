"""Configs: YAML + command line, type conversion, errors that name the key."""

import pytest

from gpt2rlhf.config import ConfigError, RMConfig, SFTConfig, load_config, parse_cli, parse_overrides, save_config


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_command_line_with_short_flags(tmp_path):
    path = write(tmp_path, "model:\n  n_layer: 2\n  n_head: 2\n  n_embd: 32\noptim:\n  lr: 1.0e-3\n")
    yaml_path, overrides, resume = parse_cli(SFTConfig, ["--config", path, "-n", "exp", "-b", "8",
                                                         "--optim.lr", "5e-4", "--data.packing", "--lora.targets",
                                                         "attn.c_attn,mlp.c_fc", "-p", "gpt2"])
    cfg = load_config(SFTConfig, yaml_path, overrides)
    assert resume is None
    assert cfg.run.exp_name == "exp" and cfg.train.batch_size == 8 and cfg.model.pretrain == "gpt2"
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.packing is True and cfg.lora.targets == ("attn.c_attn", "mlp.c_fc")
    assert cfg.model.n_layer == 2


def test_resume_flag_with_and_without_a_folder():
    assert parse_cli(SFTConfig, ["--resume"])[2] == "latest"
    assert parse_cli(SFTConfig, ["--resume", "runs/sft_x", "-n", "x"])[2] == "runs/sft_x"


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim.learning_rate'"):
        load_config(SFTConfig, overrides=parse_overrides(["--optim.learning_rate", "1"]))
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'optim.lr'"):
        load_config(SFTConfig, overrides=parse_overrides(["--optim.lrr", "1"]))
    with pytest.raises(ConfigError, match=r"unknown key 'max_step'; did you mean 'train.max_steps'"):
        load_config(SFTConfig, overrides=parse_overrides(["--max_step", "1"]))
    path = write(tmp_path, "train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown key 'train.batch_sise'; did you mean 'train.batch_size'"):
        load_config(SFTConfig, path)


def test_mistyped_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.max_steps' expects int, got 'many'"):
        load_config(SFTConfig, overrides=parse_overrides(["--train.max_steps", "many"]))
    path = write(tmp_path, "optim:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: 'optim.lr' expects float"):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match=r"train.batch_size \(10\) must be a positive multiple of train.micro_batch_size \(4\)"):
        load_config(SFTConfig, overrides=parse_overrides(["-b", "10", "--train.micro_batch_size", "4"]))
    with pytest.raises(ConfigError, match=r"data.format must be"):
        load_config(RMConfig, overrides={"data": {"format": "csv"}})


def test_broken_yaml_is_named(tmp_path):
    path = write(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: not valid YAML"):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(SFTConfig, str(tmp_path / "nope.yaml"))


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(SFTConfig, overrides=parse_overrides(["-n", "a", "--lora.r", "4", "--data.train", "x.jsonl"]))
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SFTConfig, str(tmp_path / "config.yaml")) == cfg


def test_every_preset_loads():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))
    assert len(presets) >= 4
    for path in presets:
        cls = {"sft": SFTConfig, "rm": RMConfig}.get(path.stem)
        if cls is None:
            continue
        overrides = {"model": {"pretrain": "gpt2"}} if path.stem == "rm" else None  # the RM needs -p
        cfg = load_config(cls, str(path), overrides)
        assert cfg.run.exp_name in ("imdb", "hh")
