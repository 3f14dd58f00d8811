"""Batched KV-cache sampling: greedy parity with transformers, seeds, EOS handling."""

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded, make_hf_folder

from gpt2rlhf.generation import filter_logits, generate
from gpt2rlhf.hf import from_pretrained
from gpt2rlhf.model import GPT, GPTConfig

VOCAB = 101


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our model and transformers' on the same weights; a wide init so greedy paths vary."""
    folder = tmp_path_factory.mktemp("hf")
    hf = make_hf_folder(folder, vocab_size=VOCAB, initializer_range=0.3, seed=3)
    return from_pretrained(folder).eval(), hf


def test_greedy_equals_transformers_generate_unpadded_and_padded(pair):
    model, hf = pair
    for pads in [(0, 0, 0), (4, 2, 0)]:
        ids, mask = left_padded(vocab_size=VOCAB, pads=pads, seed=5)
        ours = generate(model, ids, mask, max_new_tokens=20, temperature=0, eos_token_id=None)
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.size(1):]
        assert len(set(ours.tokens.flatten().tolist())) > 5, "greedy path too degenerate to compare"
        assert torch.equal(ours.tokens, theirs)


def test_greedy_equals_transformers_with_eos_stops(pair):
    model, hf = pair
    ids, mask = left_padded(batch_size=8, vocab_size=VOCAB, pads=(3, 0, 1, 0, 5, 0, 2, 0), seed=7)
    free = generate(model, ids, mask, max_new_tokens=16, temperature=0, eos_token_id=None)
    eos = int(free.tokens[0, 3])  # a token that row 0 emits greedily: it must stop there
    ours = generate(model, ids, mask, max_new_tokens=16, temperature=0, eos_token_id=eos, pad_token_id=0)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)[:, ids.size(1):]
    n = theirs.size(1)
    assert torch.equal(ours.tokens[:, :n], theirs)
    assert (ours.tokens[:, n:] == 0).all()


def test_sampling_is_reproducible_with_a_seed(pair):
    model, _ = pair
    ids, mask = left_padded(vocab_size=VOCAB)
    runs = [generate(model, ids, mask, max_new_tokens=12, eos_token_id=None,
                     generator=torch.Generator().manual_seed(s)).tokens for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_every_sequence_stops_at_eos_and_is_padded_after():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    eos, pad = 7, 0
    ids = torch.randint(0, 7, (32, 4))
    out = generate(model, ids, max_new_tokens=40, temperature=1.0, eos_token_id=eos, pad_token_id=pad,
                   generator=torch.Generator().manual_seed(0))
    assert out.tokens.size(1) < 40, "the loop should stop once every row has hit EOS"
    for row in range(32):
        hits = (out.tokens[row] == eos).nonzero()
        assert len(hits) >= 1
        first = int(hits[0])
        assert out.mask[row, : first + 1].all() and not out.mask[row, first + 1 :].any()
        assert (out.tokens[row, first + 1 :] == pad).all()
        assert (out.logprobs[row, first + 1 :] == 0).all()
        assert (out.logprobs[row, : first + 1] < 0).all()


def test_min_new_tokens_holds_eos_back():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    out = generate(model, torch.randint(0, 7, (16, 3)), max_new_tokens=30, min_new_tokens=5,
                   eos_token_id=7, generator=torch.Generator().manual_seed(1))
    assert (out.tokens[:, :5] != 7).all()
    assert out.mask[:, :5].all()


def test_logprobs_are_the_temperature_scaled_logprobs_of_the_full_sequence(pair):
    model, _ = pair
    ids, mask = left_padded(vocab_size=VOCAB)
    T, temp = ids.size(1), 0.7
    out = generate(model, ids, mask, max_new_tokens=8, temperature=temp, eos_token_id=None,
                   generator=torch.Generator().manual_seed(0))
    full_ids = torch.cat([ids, out.tokens], 1)
    full_mask = torch.cat([mask, out.mask], 1)
    with torch.no_grad():
        logits = model(full_ids, attention_mask=full_mask)[:, T - 1 : -1] / temp
    ref = F.log_softmax(logits, -1).gather(2, out.tokens[..., None]).squeeze(-1)
    assert torch.allclose(out.logprobs, ref, atol=1e-5)


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)  # 0.03, 0.64, 0.24, 0.09
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, True, True, False]]  # 0.64 < 0.7, so the 0.24 joins
    assert probs[kept].sum() >= 0.7
    assert (~torch.isinf(filter_logits(logits, top_p=0.1))).sum() == 1  # the top token always stays


def test_top_k_one_is_greedy(pair):
    model, _ = pair
    ids, mask = left_padded(vocab_size=VOCAB)
    greedy = generate(model, ids, mask, max_new_tokens=10, temperature=0, eos_token_id=None)
    top1 = generate(model, ids, mask, max_new_tokens=10, top_k=1, eos_token_id=None,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.tokens, top1.tokens)


def test_right_padded_prompts_are_refused(pair):
    model, _ = pair
    ids, mask = left_padded(vocab_size=VOCAB)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask.flip(1), max_new_tokens=4)


def test_prompt_plus_new_tokens_beyond_the_context_is_refused(pair):
    model, _ = pair
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, torch.zeros(1, 100, dtype=torch.long), max_new_tokens=100)


def test_inverse_cdf_sampling_follows_the_probabilities():
    from gpt2rlhf.generation import sample

    probs = torch.tensor([[0.1, 0.2, 0.0, 0.7], [0.0, 0.0, 1.0, 0.0]]).repeat(10_000, 1)
    draws = sample(probs, torch.Generator().manual_seed(0)).view(10_000, 2)
    freq = torch.bincount(draws[:, 0], minlength=4).float() / 10_000
    assert torch.allclose(freq, probs[0], atol=0.015)
    assert freq[2] == 0  # probability 0 is never drawn
    assert (draws[:, 1] == 2).all()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_shape_decoding_for_cuda_graphs_equals_the_eager_path(pair, device):
    """The step a CUDA graph replays (KVCache.index, whole-buffer attention): on CPU run
    eagerly, on a GPU (when there is one) captured and replayed."""
    model, _ = pair
    model = model.to(device)
    ids, mask = (t.to(device) for t in left_padded(vocab_size=VOCAB, pads=(4, 2, 0), seed=5))
    kwargs = dict(max_new_tokens=15, eos_token_id=None)
    eager = generate(model, ids, mask, temperature=0, cuda_graph=False, **kwargs)
    static = generate(model, ids, mask, temperature=0, cuda_graph=True, **kwargs)
    assert torch.equal(eager.tokens, static.tokens)
    assert torch.allclose(eager.logprobs, static.logprobs, atol=1e-5)
    sampled = [generate(model, ids, mask, cuda_graph=g, generator=torch.Generator(device).manual_seed(0), **kwargs)
               for g in (False, True)]
    assert torch.equal(sampled[0].tokens, sampled[1].tokens)
    if device == "cuda":  # bf16, where stale cache memory once turned into NaN logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = generate(model, ids, mask, cuda_graph=True, max_new_tokens=15, min_new_tokens=15,
                           eos_token_id=VOCAB - 1)
        assert out.mask.all() and torch.isfinite(out.logprobs).all()
    model.to("cpu")
