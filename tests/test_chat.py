"""The chat command (src/chat.py, gpt2rlhf.chat): two turns through stdin, the second feeding
only its own tokens to the model (the conversation stays in the KV cache); the cache always
agreeing with a fresh pass over the kept history, after a stop at "\\n\\nHuman:" and after
old turns are dropped at the context limit; the commands; bad options as one line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat as chat_cli
from gpt2rlhf import chat
from gpt2rlhf.chat import ChatSession, Settings, command, human_turn
from gpt2rlhf.checkpoint import save_checkpoint, step_dir
from gpt2rlhf.model import GPT, GPTConfig
from gpt2rlhf.tokenizer import get_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64)).eval()


def assert_cache_matches_history(session: ChatSession):
    """The cache holds exactly the kept history: the next-token logits it gives equal those
    of one fresh pass over the history's tokens."""
    history = session.history
    assert session.cache.pos == len(history)
    probe = [11]
    with torch.no_grad():
        fresh = session.model(torch.tensor([history + probe]))[0, -1]
        cached = session._feed(probe)
    session.cache.pos -= 1
    torch.testing.assert_close(cached, fresh, atol=1e-4, rtol=1e-4)


def test_two_turns_through_stdin_the_second_feeds_its_own_tokens(tiny, tmp_path):
    path = save_checkpoint(step_dir(tmp_path / "checkpoints", 0), {"model": tiny}, metadata={"stage": "demo", "step": 0})
    res = subprocess.run([sys.executable, str(SRC / "chat.py"), "-p", str(path), "--temperature", "0",
                          "--max-tokens", "8", "--verbose"], input="Hello there\nHow are you today?\n/stats\n/quit\n",
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    turns = re.findall(r"turn \d: .*", res.stdout)  # /stats, after the prompt "You: "
    assert len(turns) == 2, res.stdout
    enc = get_tokenizer()
    own = [len(enc.encode(human_turn(m))) for m in ("Hello there", "How are you today?")]
    for line, n in zip(turns, own):  # "turn i: processed P tokens (prompt n, generated g, rebuilt 0, ...)"
        processed, prompt = int(line.split()[3]), int(line.split("prompt ")[1].split(",")[0])
        generated = int(line.split("generated ")[1].split(",")[0])
        assert prompt == n and "rebuilt 0," in line and processed == prompt + generated <= n + 8
    history = int(res.stdout.split("history: ")[1].split()[0])
    turn1 = int(turns[0].split()[3])
    assert int(turns[1].split()[3]) < history and history <= turn1 + own[1] + 8  # turn 2 never re-fed turn 1
    assert res.stdout.count("Assistant:") == 2 and "[processed" in res.stdout


def test_the_cache_agrees_with_the_history_over_turns(tiny):
    session = ChatSession(tiny, get_tokenizer(), Settings(temperature=0.9, top_p=0.9, max_tokens=10), seed=1)
    shown = []
    for message in ("Hi", "What is a movie?", "Thanks"):
        reply = session.reply(message, shown.append)
        assert reply == "".join(shown).strip()
        shown.clear()
        assert_cache_matches_history(session)
    assert session.transcript.startswith("\n\nHuman: Hi\n\nAssistant:")
    assert session.transcript.count("\n\nHuman:") == 3


def test_a_reply_stops_at_the_next_human_turn_and_the_cache_rolls_back(tiny, monkeypatch):
    enc = get_tokenizer()
    script = iter(enc.encode(" Sure thing.\n\nHuman: and then I say more"))
    monkeypatch.setattr(chat, "sample_rows", lambda *a: torch.tensor([next(script)]))
    session = ChatSession(tiny, enc, Settings(max_tokens=20))
    shown = []
    assert session.reply("Help me", shown.append) == "Sure thing."
    assert "".join(shown) == " Sure thing."  # "\n\nHuman:" and what follows never shown
    assert session.transcript == "\n\nHuman: Help me\n\nAssistant: Sure thing."
    assert_cache_matches_history(session)


def test_old_turns_are_dropped_at_the_context_limit_and_the_cache_rebuilt(tiny):
    session = ChatSession(tiny, get_tokenizer(), Settings(temperature=0, max_tokens=30))
    for i in range(6):
        session.reply(f"Message number {i} is a little longer than the others")
        assert len(session.history) + 30 <= 128
        assert_cache_matches_history(session)
    dropped = [s for s in session.stats if s.dropped_turns]
    assert dropped and all(s.rebuilt_tokens or s.dropped_turns for s in dropped)
    assert any(s.rebuilt_tokens > 0 for s in dropped)
    assert "Message number 0" not in session.transcript and "Message number 5" in session.transcript


def test_commands_change_settings_reset_and_quit(tiny, capsys):
    session = ChatSession(tiny, get_tokenizer(), Settings(max_tokens=4))
    session.reply("Hi")
    assert command(session, "/temperature 0.3") and session.settings.temperature == 0.3
    assert command(session, "/top_p 0.5") and session.settings.top_p == 0.5
    assert command(session, "/max_tokens 12") and session.settings.max_tokens == 12
    assert command(session, "/max_tokens 500") and session.settings.max_tokens == 12  # refused: over the context
    assert command(session, "/temperature warm") and session.settings.temperature == 0.3
    assert "needs" in capsys.readouterr().out
    assert command(session, "/reset") and session.history == [] and session.cache.pos == 0
    assert command(session, "/help") and "/quit" in capsys.readouterr().out
    assert not command(session, "/quit")


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1", "-p", "x"], "argument --temperature: must be a number >= 0"),
    (["--max-tokens", "0", "-p", "x"], "argument --max-tokens: must be >= 1"),
    ([], "give -p/--pretrain"),
    (["-p", "./no/such/run"], "no such file or folder"),
])
def test_bad_options_are_one_line_and_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        chat_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
