"""Review of the chat command and the OpenAI-compatible server (merge 3a57a2f): one test per
finding. Each test shows a defect and fails until its fix lands (see the review report)."""

import json
import socket
import time

import openai
import pytest
import requests
import torch

from gpt2rlhf.model import GPT, GPTConfig
from gpt2rlhf.serving import ServerSettings, build_app
from gpt2rlhf.tokenizer import EOT_TOKEN, get_tokenizer

from test_serving import serve


def tiny_model(block_size=128, vocab_size=50257, force_token=None, seed=0):
    """A tiny random GPT-2; `force_token`: its final layer norm outputs that token's embedding
    scaled up, so (tied head) that token wins every step."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=64)).eval()
    if force_token is not None:
        with torch.no_grad():
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[force_token] * 1e4)
    return model


@pytest.fixture(scope="module")
def server():
    """A tiny model with a long context (so a reply can run for seconds) and a small body limit."""
    app = build_app(tiny_model(block_size=1024), get_tokenizer(),
                    ServerSettings(model_name="tiny", max_tokens_limit=1000, max_body_bytes=2_000))
    url, srv, thread = serve(app)
    yield url, app
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def server_of():
    """Start a server for a given model; stopped after the test."""
    started = []

    def start(model, name):
        url, srv, thread = serve(build_app(model, get_tokenizer(), ServerSettings(model_name=name)))
        started.append((srv, thread))
        return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)

    yield start
    for srv, thread in started:
        srv.should_exit = True
        thread.join(timeout=10)


def post(url, path, body, **kw):
    return requests.post(url + path, json=body, timeout=30, **kw)


def assert_error_object(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# -- finding 1: "<|endoftext|>" written in a prompt or a message is a 500 (tiktoken refuses it)

def test_endoftext_written_in_a_prompt_or_message_is_not_a_500(server):
    url, _ = server
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "a <|endoftext|> b", "max_tokens": 2})
    assert r.status_code == 200, r.text  # now: 500 "internal error (ValueError)"
    r = post(url, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                           "messages": [{"role": "user", "content": "what is <|endoftext|>?"}]})
    assert r.status_code == 200, r.text


# -- finding 2: an empty prompt is refused alone but decoded from nothing inside a list

def test_an_empty_prompt_in_a_list_is_a_400_like_an_empty_prompt_alone(server):
    url, _ = server
    alone = assert_error_object(post(url, "/v1/completions", {"model": "tiny", "prompt": "", "max_tokens": 2}), 400)
    assert alone["param"] == "prompt"
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": ["Hello", ""], "max_tokens": 2})
    assert assert_error_object(r, 400)["param"] == "prompt"  # now: 200, the "" row sampled from padding


# -- finding 3: a chunked body over the limit is FastAPI's 400 "error parsing the body", not 413

def test_a_chunked_body_over_the_limit_is_413(server):
    url, _ = server
    body = json.dumps({"model": "tiny", "prompt": "x" * 5_000}).encode()
    chunks = (body[i:i + 500] for i in range(0, len(body), 500))  # no Content-Length: Transfer-Encoding chunked
    r = requests.post(url + "/v1/completions", data=chunks, timeout=30, headers={"Content-Type": "application/json"})
    assert assert_error_object(r, 413)["code"] == "request_too_large"


# -- finding 4: a temperature that is tiny but > 0 overflows logits / T: NaN, EOS at once

def test_a_tiny_temperature_samples_like_greedy(server):
    url, _ = server
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)
    greedy = c.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0).choices[0]
    tiny_t = c.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=1e-40).choices[0]
    assert greedy.finish_reason == "length" and len(greedy.text) > 0
    assert (tiny_t.text, tiny_t.finish_reason) == (greedy.text, greedy.finish_reason)  # now: ("", "stop")


# -- finding 5: OpenAI's "developer" role (the system role of current models) is a 400

def test_the_developer_role_is_taken_as_a_system_message(server):
    url, _ = server
    r = post(url, "/v1/chat/completions", {"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text


# -- finding 6: a non-streaming client that goes away keeps its rows decoding to max_tokens

def test_a_non_streaming_client_that_goes_away_frees_its_slot(server):
    url, app = server
    engine = app.state.engine
    cancelled, tokens = engine.stats["cancelled_rows"], engine.stats["tokens"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "prompt": "Go on", "max_tokens": 1000, "temperature": 0})
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        deadline = time.time() + 10
        while engine.stats["tokens"] == tokens and time.time() < deadline:  # decoding has begun
            time.sleep(0.005)
    deadline = time.time() + 30  # the socket is closed: the client is gone
    while engine.active and time.time() < deadline:
        time.sleep(0.01)
    assert engine.active == 0
    assert engine.stats["cancelled_rows"] == cancelled + 1  # now: decoded all 1000 tokens for no one
    assert engine.stats["tokens"] - tokens < 1000


# -- finding 7: min_tokens (vLLM's extension, which evaluate.py sends for min_new_tokens) is ignored

def test_min_tokens_keeps_eos_away_until_that_many_tokens(server_of):
    c = server_of(tiny_model(force_token=EOT_TOKEN), "eos")  # EOS wins every step unless masked
    r = c.completions.create(model="eos", prompt="Hi", max_tokens=6, temperature=0, extra_body={"min_tokens": 3})
    assert r.usage.completion_tokens >= 3, (r.choices[0], r.usage)  # now: 1 (EOS at once)


# -- finding 8: a model whose vocabulary is padded past the tokenizer's (50304) fails the whole batch

def test_a_padded_vocabulary_never_yields_a_token_the_tokenizer_lacks(server_of):
    c = server_of(tiny_model(vocab_size=50304, force_token=50300), "padded")  # its favourite id is no token
    r = c.completions.create(model="padded", prompt="Hi", max_tokens=3, temperature=0)  # now: 500 KeyError
    assert r.choices[0].finish_reason in ("stop", "length")
