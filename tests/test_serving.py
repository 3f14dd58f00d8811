"""The OpenAI-compatible server (gpt2rlhf.serving, src/serve.py) on 127.0.0.1, spoken to with
the real `openai` client and with raw HTTP: completions and chat, streamed and not (the same
text at temperature 0), finish_reason for EOS, stop strings and the length limit, seeds,
the API key, every bad request as its 4xx with OpenAI's error object, a small load test
(32 concurrent streaming clients), and a client that disconnects mid-stream."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch

from gpt2rlhf.checkpoint import save_checkpoint, step_dir
from gpt2rlhf.loading import load
from gpt2rlhf.model import GPT, GPTConfig
from gpt2rlhf.serving import ServerSettings, build_app, transcript, Message
from gpt2rlhf.tokenizer import EOT_TOKEN, get_tokenizer

KEY = "test-key"


def tiny_checkpoint(folder, eos_always=False):
    """demo_model()'s tiny random GPT-2 saved as our checkpoint; `eos_always`: its final
    layer norm outputs the EOS embedding scaled up, so (tied head) EOS wins every step by
    a margin no temperature undoes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64))
    if eos_always:
        with torch.no_grad():
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[EOT_TOKEN] * 1e4)
    return save_checkpoint(step_dir(folder / "checkpoints", 0), {"model": model}, metadata={"stage": "demo", "step": 0})


def serve(app):
    """Run `app` with uvicorn in a thread on a free 127.0.0.1 port: (base url, server, thread)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    assert server.started
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model behind the server with an API key: (base url, app)."""
    model = load(tiny_checkpoint(tmp_path_factory.mktemp("tiny")), kind="lm").eval()
    app = build_app(model, get_tokenizer(), ServerSettings(model_name="tiny", api_key=KEY, max_tokens_limit=100,
                                                           max_body_bytes=20_000, max_batch=32))
    url, srv, thread = serve(app)
    yield url, app
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_streamed_equals_not_streamed_at_temperature_0(client):
    whole = client.completions.create(model="tiny", prompt="The movie was", max_tokens=12, temperature=0)
    (choice,) = whole.choices
    assert choice.finish_reason == "length" and choice.text
    assert whole.usage.prompt_tokens == len(get_tokenizer().encode("The movie was"))
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.completions.create(model="tiny", prompt="The movie was", max_tokens=12, temperature=0,
                                            stream=True))
    assert len(chunks) > 2  # text arrives in pieces
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_chat_streamed_equals_not_streamed_at_temperature_0(client):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "How are you?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    prompt = transcript([Message(**m) for m in messages])
    assert prompt == "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    assert whole.usage.prompt_tokens == len(get_tokenizer().encode(prompt))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]  # content as parts
    assert client.chat.completions.create(model="tiny", messages=parts, max_tokens=10,
                                          temperature=0).choices[0].message.content == choice.message.content


def test_a_stop_string_ends_the_text_before_it_streamed_or_not(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0).choices[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 4]  # a string from the middle, maybe across tokens
    cut = full.text[:full.text.index(stop)]
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                      stop=[stop, "never appears"]).choices[0]
    assert (whole.text, whole.finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_eos_ends_a_reply_with_finish_reason_stop(tmp_path):
    model = load(tiny_checkpoint(tmp_path, eos_always=True), kind="lm").eval()
    url, srv, thread = serve(build_app(model, get_tokenizer(), ServerSettings(model_name="eos")))
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)  # no key needed here
        r = c.completions.create(model="eos", prompt="Hello", max_tokens=10, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
        chunks = list(c.chat.completions.create(model="eos", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=10, stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("a_prompt, b_prompt", [
    ("A long story begins like this", "Short"),  # B padded on the left to A's columns
    ("Hi", "A much longer prompt than the one already decoding, by many tokens"),  # A padded to B's
])
def test_a_request_joins_a_running_batch_and_both_keep_their_own_text(server, client, a_prompt, b_prompt):
    """Continuous batching: B arrives while A decodes, is prefilled, joins A's batch (the
    two laid side by side in one cache) and leaves it; each gets the text it gets alone."""
    engine = server[1].state.engine
    a = dict(model="tiny", prompt=a_prompt, max_tokens=100, temperature=0)
    b = dict(model="tiny", prompt=b_prompt, max_tokens=10, temperature=0)
    a_alone, b_alone = (client.completions.create(**x).choices[0].text for x in (a, b))
    before = dict(engine.stats)
    chunks = iter(client.completions.create(**a, stream=True))
    a_text = next(chunks).choices[0].text  # A is decoding now
    b_text = client.completions.create(**b).choices[0].text
    a_text += "".join(c.choices[0].text for c in chunks)
    assert (a_text, b_text) == (a_alone, b_alone)
    assert engine.stats["prefills"] - before["prefills"] == 2
    assert engine.stats["steps"] - before["steps"] < 100 + 10  # B's steps were A's steps


def test_a_seed_gives_the_same_samples_and_n_gives_n_choices(client):
    def ask(seed):
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=1.0, top_p=0.95,
                                      seed=seed, n=3)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    first = ask(7)
    assert len(first) == 3 and len(set(first)) > 1  # each choice its own stream
    assert ask(7) == first and ask(8) != first


def test_without_the_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.get(server[0] + "/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "tiny"}), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": -1}), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 101}), 400, "max_tokens"),  # over the server's limit
    (json.dumps({"model": "tiny", "prompt": "word " * 100, "max_tokens": 50}), 400, "max_tokens"),  # past the context
    (json.dumps({"model": "tiny", "prompt": "word " * 200}), 400, "prompt"),  # a prompt over the context
    (json.dumps({"model": "tiny", "prompt": "x", "n": 40}), 400, "n"),
    (json.dumps({"model": "gpt-4", "prompt": "x"}), 404, "model"),
    (json.dumps({"model": "tiny", "prompt": "x" * 30_000}), 413, None),  # over max_body_bytes
])
def test_a_bad_request_is_its_4xx_with_an_error_object(server, body, status, param):
    r = requests.post(server[0] + "/v1/completions", data=body, timeout=10,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert "Traceback" not in r.text


def test_bad_chat_requests_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 200}])


def test_32_concurrent_streaming_clients_are_all_answered_in_shared_batches(server, client):
    prefills_before = server[1].state.engine.stats["prefills"]

    def one_client(i):
        texts = []
        for j in range(2):
            chunks = list(client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Client {i}, question {j}"}], max_tokens=4,
                temperature=0.8, seed=i, stream=True))
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
            texts.append("".join(c.choices[0].delta.content or "" for c in chunks))
        return texts

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one_client, range(32)))
    assert len(answers) == 32 and all(len(a) == 2 for a in answers)
    stats = requests.get(server[0] + "/health", timeout=10).json()
    assert stats["in_flight"] == 0
    assert stats["largest_batch"] > 1 and stats["prefills"] - prefills_before < 64  # requests joined batches together
    assert client.completions.create(model="tiny", prompt="Still there?", max_tokens=2).choices[0].text is not None


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    url, app = server
    engine = app.state.engine
    cancelled = engine.stats["cancelled_rows"]
    r = requests.post(url + "/v1/completions", stream=True, timeout=10, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "Go on", "max_tokens": 100, "stream": True})
    lines = r.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")
    r.close()  # gone after the first chunk, 99 tokens early
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.01)
    assert engine.active == 0 and engine.stats["cancelled_rows"] == cancelled + 1


def test_evaluate_compares_a_served_model_like_a_checkpoint(server, tmp_path, monkeypatch, capsys):
    """evaluate.py with -m openai:<url>#tiny (this server) and the same weights as a local
    checkpoint: at temperature 0 both give the same responses; the served one has no KL."""
    import evaluate

    monkeypatch.setenv("SERVED_API_KEY", KEY)
    local = tiny_checkpoint(tmp_path / "local")
    prompts = tmp_path / "hh.jsonl"
    prompts.write_text("".join(json.dumps({"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: Answer {i}.",
                                           "rejected": "\n\nHuman: Q?\n\nAssistant: No."}) + "\n" for i in range(4)))
    out = tmp_path / "eval"
    evaluate.main(["-m", f"openai:{server[0]}/v1#tiny", "-m", str(local), "--names", "served,local", "--no-judge",
                   "--prompts", str(prompts), "--num-prompts", "4", "--max-new-tokens", "8", "--temperature", "0",
                   "--samples", "0", "--device", "cpu", "--out", str(out)])
    enc = get_tokenizer()

    def texts(name):
        return [enc.decode([t for t in r if t != EOT_TOKEN]) for r in
                json.loads((out / f"responses_{name}.json").read_text())["responses"]]

    assert texts("served") == texts("local")
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert "kl_to_reference" not in metrics["served"] and "kl_to_reference" in metrics["local"]
    assert "reference_perplexity" in metrics["served"]
    assert "Served models (served): no KL" in (out / "report.md").read_text()

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["-m", f"openai:{server[0]}/v1#nope", "-m", str(local), "--no-judge", "--prompts", str(prompts),
                       "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has no model `nope`; it has tiny" in err and not (tmp_path / "bad").exists()


def test_over_max_concurrent_is_429_until_a_slot_is_freed(tmp_path):
    model = load(tiny_checkpoint(tmp_path), kind="lm").eval()
    url, srv, thread = serve(build_app(model, get_tokenizer(), ServerSettings(model_name="one", max_concurrent=1)))
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        first = c.completions.create(model="one", prompt="Go on", max_tokens=120, stream=True)
        next(iter(first))  # in flight
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="one", prompt="Me too", max_tokens=2)
        assert e.value.body["code"] == "rate_limit_exceeded"
        first.close()  # the client goes: its slot is freed at the next decode step
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                assert c.completions.create(model="one", prompt="Me too", max_tokens=2).choices[0].finish_reason
                break
            except openai.RateLimitError:
                time.sleep(0.02)
        else:
            pytest.fail("the slot was never freed")
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("argv, message", [
    (["-p", "x", "--port", "70000"], "argument --port: must be a port number"),
    (["-p", "x", "--max-batch", "0"], "argument --max-batch: must be >= 1"),
    (["-p", "x", "--api-key", ""], "argument --api-key: give a non-empty key"),
    (["--port", "8000"], "give -p/--pretrain"),
    (["-p", "./no/such/run"], "no such file or folder"),
])
def test_serve_bad_options_are_one_line_and_status_2(argv, message, capsys):
    import serve as serve_cli

    with pytest.raises(SystemExit) as e:
        serve_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
