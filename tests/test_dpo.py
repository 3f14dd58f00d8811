"""DPO (stages/dpo.py): the losses against hand-computed values, log-probs over response tokens
only, the reference being exactly the SFT model (LoRA adapters off, and a frozen copy), a
loss of exactly log 2 before any update, the command line, exact resume after SIGKILL, and
bad input as one error line. Tiny models (1 layer, 32 wide), a few steps each."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, kill_after_checkpoint, write_reviews

from gpt2rlhf.checkpoint import latest_checkpoint, load_model, load_trainer_state, save_checkpoint
from gpt2rlhf.config import DataArgs, DPOArgs, DPOConfig, load_config
from gpt2rlhf.data import collate_dpo, collate_pairs, load_records, pair_examples
from gpt2rlhf.loading import load
from gpt2rlhf.losses import dpo_loss
from gpt2rlhf.model import GPT, GPTConfig, GPTScalar
from gpt2rlhf.stages import dpo
from gpt2rlhf.stages.common import open_run
from gpt2rlhf.tokenizer import EOT_TOKEN, get_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)
LOG2 = torch.tensor(2.0).log()
HH = [{"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: A kind and helpful answer {i}.",
       "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: No." + " Go away." * (i % 3)} for i in range(24)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An "SFT run" (a random tiny GPT-2 saved as a run folder), an RM checkpoint, reviews
    and HH-style pairs."""
    base = tmp_path_factory.mktemp("dpo")
    torch.manual_seed(0)
    save_checkpoint(base / "sft" / "checkpoints" / "step_00000001", {"model": GPT(SMALL)}, metadata={"stage": "sft"})
    rm = save_checkpoint(base / "rm" / "step_00000001", {"model": GPTScalar(SMALL)}, metadata={"stage": "rm"})
    hh = base / "hh.jsonl"
    hh.write_text("".join(json.dumps(r) + "\n" for r in HH))
    return {"sft": str(base / "sft"), "rm": str(rm), "reviews": write_reviews(base / "reviews.jsonl", n=48),
            "hh": str(hh)}


def cfg_of(tmp_path, files, *extra, data="reviews"):
    return load_config(DPOConfig, overrides=[*TINY_ARGS, "-p", files["sft"], "--data.train", files[data],
                                             "--run.out_dir", str(tmp_path / "runs"), "--optim.lr", "1e-2", *extra])


def scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------ the losses, by hand

def test_dpo_ipo_and_conservative_losses_match_hand_computed_values():
    # pair 1: the policy raised chosen by 1 nat and lowered rejected by 1 (h = 2); pair 2: h = 0
    pc, pr = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -6.0])
    rc, rr = torch.tensor([-2.0, -5.0]), torch.tensor([-2.0, -6.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # -log sigmoid(0.5 * 2) = log(1 + e^-1); -log sigmoid(0) = log 2
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2, abs=1e-7)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.0]
    # conservative DPO, eps = 0.2: 0.8 log(1 + e^-1) + 0.2 log(1 + e) = log(1 + e^-1) + 0.2
    loss, _, _ = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.5, label_smoothing=0.2)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)) + 0.2, abs=1e-7)
    # IPO: (h - 1 / (2 beta))^2: (2 - 1)^2 and (0 - 1)^2 with beta 0.5; h on target with beta 0.25
    assert dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")[0].item() == 1.0
    assert dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.25, loss_type="ipo")[0].item() == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")


def test_ipo_compares_mean_log_probs_per_response_token_and_logs_the_implicit_kl():
    # summed log-probs of 2 rows (chosen, rejected) with 2 and 4 response tokens
    logps, counts, ref = torch.tensor([-2.0, -8.0]), torch.tensor([2.0, 4.0]), torch.tensor([-4.0, -4.0])
    loss, m = dpo.dpo_objective(DPOArgs(beta=0.5, loss="ipo"), logps, counts, ref)
    h = (-2 / 2 - -4 / 2) - (-8 / 4 - -4 / 4)  # mean log-ratios: 1 - (-1) = 2
    assert loss.item() == pytest.approx((h - 1) ** 2)
    assert m["rewards_chosen"].item() == 0.5 and m["rewards_rejected"].item() == -0.5
    assert m["rewards_accuracy"].item() == 1.0 and m["rewards_margin"].item() == 1.0
    assert m["kl"].item() == pytest.approx(((-2 + 4) + (-8 + 4)) / 2)  # summed log-ratio per response
    loss, m = dpo.dpo_objective(DPOArgs(beta=0.5), logps, counts, ref)  # sigmoid: sums, not means
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5 * (2 - -4))))
    assert m["rewards_chosen"].item() == 1.0 and m["rewards_rejected"].item() == -2.0


# ------------------------------------------------------------------ response tokens only

def test_pairs_know_their_prompt_and_the_mask_covers_responses_only(tmp_path, files):
    enc = get_tokenizer()
    ds = load_records(files["hh"], "data.train")
    pairs, _ = pair_examples(ds, DataArgs(max_length=48), enc, "data.train")
    prompt = enc.encode("\n\nHuman: Question 0?\n\nAssistant:")
    assert pairs[0]["prompt_len"] == len(prompt) and pairs[0]["chosen"][:len(prompt)] == prompt
    batch = collate_dpo(pairs[:3])
    assert {k: v for k, v in batch.items() if k != "loss_mask"}.keys() == collate_pairs(pairs[:3]).keys()
    assert torch.equal(batch["input_ids"], collate_pairs(pairs[:3])["input_ids"])  # the RM's batch, plus the mask
    for row, e in enumerate(pairs[:3] * 2):
        ids = e["chosen"] if row < 3 else e["rejected"]
        expected = [0] * e["prompt_len"] + [1] * (len(ids) - e["prompt_len"])
        expected += [0] * (batch["input_ids"].size(1) - len(ids))
        assert batch["loss_mask"][row].tolist() == expected
    # labelled pairs: two different texts and no prompt; every token but the first is response
    reviews, _ = pair_examples(load_records(files["reviews"], "data.train"), DataArgs(max_length=48), enc, "d")
    b = collate_dpo(reviews[:2])
    assert reviews[0]["prompt_len"] == 0
    assert torch.equal(b["loss_mask"][:, 1:], b["attention_mask"][:, 1:]) and not b["loss_mask"][:, 0].any()


def test_the_gradient_comes_from_response_tokens_only(files):
    enc = get_tokenizer()
    pairs, _ = pair_examples(load_records(files["hh"], "data.train"), DataArgs(max_length=48), enc, "d")
    batch = collate_dpo(pairs[:4])
    assert (batch["attention_mask"] == 0).any()  # padding is there to be ignored
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, SMALL.vocab_size, requires_grad=True)
    logps, counts = dpo.response_logps(logits, batch)
    ref = logps.detach() - torch.arange(8.0)  # some log-ratio, so that the loss has a gradient
    loss, _ = dpo.dpo_objective(DPOArgs(), logps, counts, ref)
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0  # (2B, T): the positions the loss reads
    predicts_response = torch.zeros_like(touched)
    predicts_response[:, :-1] = batch["loss_mask"][:, 1:].bool()  # position t predicts token t + 1
    assert torch.equal(touched, predicts_response)
    assert torch.equal(counts, batch["loss_mask"][:, 1:].sum(-1).float())


# ------------------------------------------------------------------ the reference is the SFT model

def sft_logps(files, batch):
    with torch.no_grad():
        return dpo.sequence_logps(load(files["sft"], kind="lm").eval(), batch)[0]


@pytest.mark.parametrize("lora", [False, True], ids=["frozen-copy", "lora-off"])
def test_before_any_update_the_loss_is_log_2_and_the_reference_is_exactly_sft(tmp_path, files, lora):
    cfg = cfg_of(tmp_path, files, *(["--lora.r", "4"] if lora else []))
    run = open_run(cfg, "dpo")
    model, forward, reference = dpo.dpo_models(run, files["sft"])
    assert (reference is None) == lora
    enc = get_tokenizer()
    pairs, _ = pair_examples(load_records(files["hh"], "data.train"), DataArgs(max_length=48), enc, "d")
    batch = collate_dpo(pairs[:4])
    ref = dpo.reference_logps(model, reference, batch)
    assert torch.equal(ref, sft_logps(files, batch))
    for loss_type in ("sigmoid", "ipo"):
        logps, counts = dpo.sequence_logps(forward, batch)
        loss, m = dpo.dpo_objective(DPOArgs(loss=loss_type, beta=0.5), logps, counts, ref)
        if loss_type == "sigmoid":
            assert torch.equal(loss, LOG2)
        else:
            assert loss.item() == 1.0  # (0 - 1 / (2 * 0.5))^2
        assert m["rewards_chosen"].item() == 0.0 and m["rewards_rejected"].item() == 0.0 and m["kl"].item() == 0.0


def test_lora_dpo_run_keeps_its_reference_exactly_sft_while_the_policy_moves(tmp_path, files):
    run_dir = dpo.train(cfg_of(tmp_path, files, "--lora.r", "4", "--dpo.loss", "ipo", "--train.max_steps", "3",
                               data="hh"))
    enc = get_tokenizer()
    pairs, _ = pair_examples(load_records(files["hh"], "data.train"), DataArgs(max_length=48), enc, "d")
    batch = collate_dpo(pairs[:4])
    policy = load_model(latest_checkpoint(run_dir / "checkpoints"), kind="lm")  # adapters kept, not merged
    assert policy.lora_config.r == 4
    ref = dpo.reference_logps(policy, None, batch)
    assert torch.equal(ref, sft_logps(files, batch))
    with torch.no_grad():
        assert not torch.equal(dpo.sequence_logps(policy, batch)[0], ref)  # it trained
    logged = scalars(run_dir)
    assert logged["loss/train"][0] == 25.0  # IPO before any update: (0 - 1 / (2 * 0.1))^2
    assert logged["objective/rewards_margin"][-1] > 0  # and the step-size is enough to move it


# ------------------------------------------------------------------ the command line, resume, bad input

def test_train_dpo_from_the_command_line_and_its_resume_after_sigkill(tmp_path, files):
    """One uninterrupted run from the command line (in process): its metrics, the SFT
    checkpoint it pins, evaluate.py's loader, the reference again exactly SFT when resumed;
    then the same command SIGKILLed after a checkpoint and resumed ends with its weights."""
    # the script as a user runs it, beside the in-process run (its start-up is most of its time)
    help_ = subprocess.Popen([sys.executable, "training/train_dpo.py", "--help"], cwd=SRC, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    # short openings: a step here is mostly the 50257-way softmax, twice (policy and reference)
    args = [*TINY_ARGS, "-p", files["sft"], "--data.train", files["reviews"], "--optim.lr", "1e-3",
            "--data.max_length", "16", "--data.openings_only", "true", "--train.max_steps", "8",
            "--train.save_every", "2", "--train.keep_checkpoints", "0", "--train.eval_every", "4",
            "--dpo.label_smoothing", "0.1", "-n", "cli"]
    with pytest.raises(SystemExit) as done:  # main() returns normally; cli raises only on errors
        dpo.main([*args, "--run.out_dir", str(tmp_path / "whole")])
        raise SystemExit(0)
    assert done.value.code == 0
    (whole,) = (tmp_path / "whole").glob("dpo_cli_*")
    logged = scalars(whole)
    for tag in ("loss/train", "loss/eval", "val/accuracy", "val/margin", "val/kl", "val/rewards_chosen",
                "objective/rewards_chosen", "objective/rewards_rejected", "objective/rewards_margin",
                "objective/rewards_accuracy", "objective/logps_chosen", "objective/logps_rejected", "objective/kl"):
        assert tag in logged, tag
    assert len(logged["loss/train"]) == 8 and len(logged["val/accuracy"]) == 2
    assert logged["loss/train"][0] == pytest.approx(math.log(2), abs=1e-7)  # policy == reference at step 0
    assert logged["objective/rewards_chosen"][0] == 0.0 and logged["objective/kl"][0] == 0.0
    assert logged["objective/kl"][-1] != 0.0 and logged["objective/rewards_margin"][-1] > 0
    # the run pins the exact SFT checkpoint it started from, and evaluate.py loads it as a model source
    config = (whole / "config.yaml").read_text()
    assert str(Path(files["sft"]).resolve() / "checkpoints" / "step_00000001") in config
    assert isinstance(load(str(whole), kind="lm"), GPT)
    # resumed, the frozen reference is again exactly the SFT model
    cfg = load_config(DPOConfig, str(whole / "config.yaml"))
    model, _, reference = dpo.dpo_models(open_run(cfg, "dpo", whole), cfg.model.pretrain)
    enc = get_tokenizer()
    pairs, _ = pair_examples(load_records(files["hh"], "data.train"), DataArgs(max_length=48), enc, "d")
    batch = collate_dpo(pairs[:4])
    assert torch.equal(dpo.reference_logps(model, reference, batch), sft_logps(files, batch))
    out, err = help_.communicate(timeout=120)
    assert help_.returncode == 0 and "training/train_dpo.py --config ../configs/imdb/dpo.yaml" in out, err
    assert "--dpo.beta" in out and "--dpo.label_smoothing" in out and "ipo" in out

    # SIGKILL after checkpoint 2, then --resume: the uninterrupted run's weights, exactly
    out = tmp_path / "killed"
    run_dir = kill_after_checkpoint([sys.executable, "training/train_dpo.py", *args, "--run.out_dir", str(out)],
                                    SRC, out, 2)
    killed_at = load_trainer_state(latest_checkpoint(run_dir / "checkpoints"))["step"]
    assert 2 <= killed_at < 8
    with pytest.raises(SystemExit) as done:
        dpo.main(["--resume", str(run_dir)])
        raise SystemExit(0)
    assert done.value.code == 0
    final = latest_checkpoint(run_dir / "checkpoints")
    assert final.name == "step_00000008"
    a = load_model(latest_checkpoint(whole / "checkpoints")).state_dict()
    b = load_model(final).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["--dpo.beta", "0"], "dpo.beta must be > 0, got 0"),
    (["--dpo.label_smoothing", "0.5"], r"dpo.label_smoothing must be in \[0, 0.5\)"),
    (["--dpo.loss", "ipo", "--dpo.label_smoothing", "0.1"], "applies to the sigmoid loss only"),
    (["--dpo.loss", "hinge"], "dpo.loss must be sigmoid or ipo"),
    (["--model.dropout", "0.1"], "model.dropout must be 0 for DPO"),
    (["-p", "RM"], r"model.pretrain: .*holds a scalar-head"),
    (["-p", "none"], "dpo needs -p/--pretrain"),
], ids=["beta", "smoothing", "ipo-smoothing", "loss", "dropout", "reward-model", "no-pretrain"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, files, capsys, extra, message):
    import re

    extra = [files["rm"] if x == "RM" else x for x in extra]
    with pytest.raises(SystemExit) as done:
        dpo.main([*TINY_ARGS, "-p", files["sft"], "--data.train", files["reviews"],
                  "--run.out_dir", str(tmp_path / "runs"), *extra])
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing left behind
