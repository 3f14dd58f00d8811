"""The per-token inspector of PPO runs (gpt2rlhf.inspector, src/inspect_rollouts.py): the
page from records built here (escaping, every quantity on every token, the choice of
iterations, one-line errors), then from a real tiny PPO run through the command line, and
that page in headless chromium (tooltips, the colour switch, no script errors)."""

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from test_ppo import dollar_share, prompts, small_cfg

import inspect_rollouts
from gpt2rlhf import inspector
from gpt2rlhf.inspector import QUANTITIES, InspectorError, build_page, choose_iterations, shown
from gpt2rlhf.stages import ppo

SRC = Path(__file__).resolve().parents[1] / "src"
HAVE_CHROMIUM = bool(shutil.which("chromium") and shutil.which("chromedriver"))
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM, reason="no chromium and chromedriver on PATH "
                                    "(Debian: apt-get install chromium chromium-driver)")


def record(iteration, rows, seed=0):
    """A saved iteration as PPOLab.save_rollouts writes it, from rows of (prompt, tokens)."""
    g = torch.Generator().manual_seed(seed + iteration)
    out = []
    for prompt, tokens in rows:
        n = len(tokens)
        row = {"prompt_ids": [1, 2], "prompt": prompt, "response_ids": list(range(n)), "tokens": tokens,
               "raw_score": 0.5, "score": 0.1}
        row.update({key: torch.randn(n, generator=g) for key, _, _ in QUANTITIES.values()})
        row["ratio"] = 1 + row["ratio"] / 10
        out.append(row)
    return {"iteration": iteration, "rows": out, "scalars": {"objective/raw_score": 0.5, "objective/kl": 0.25,
                                                            "objective/kl_coef": 0.05}}


def save_run(folder, iterations):
    (folder / "rollouts").mkdir(parents=True)
    for i in iterations:
        torch.save(record(i, [("Hi", ["a", "b"])]), folder / "rollouts" / f"iteration_{i:06d}.pt")
    return folder


class Tokens(HTMLParser):
    """The token spans of a page: their attributes and their text."""

    def __init__(self, page):
        super().__init__()
        self.spans, self.inside = [], False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "span" and ("class", "tok") in attrs:
            self.spans.append({**dict(attrs), "text": ""})
            self.inside = True

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.spans[-1]["text"] += data


def saved_tokens(records):
    """(row, token index) of every response token of the records, in page order."""
    return [(row, t) for r in records for row in r["rows"] for t in range(len(row["tokens"]))]


def test_token_text_is_escaped_and_whitespace_shown():
    tokens = ["<u>", " & ", "\"q'", "\n", "\t", " caf\u00e9", "</script>"]
    page = build_page([record(1, [("<script>alert(1)</script>\n", tokens)])])
    assert page.isascii()
    assert "<u>" not in page and "alert(1)</script>" not in page and page.count("</script>") == 2
    spans = Tokens(page).spans
    assert [s["text"] for s in spans] == ["<u>", " & ", "\"q'", "\u21b5", "\u2192", " caf\u00e9", "</script>"]
    assert [s["data-token"] for s in spans] == tokens  # the tooltip shows the token as it is
    assert [s["data-token-index"] for s in spans] == [str(t) for t in range(len(tokens))]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&#8629;" in page  # the prompt too


def test_every_token_carries_every_quantity_for_the_switch():
    rec = record(5, [("A", ["x", "y", "z"]), ("B", ["w"])])
    rec["rows"][1]["ratio"][0] = float("nan")
    page = build_page([rec], color="advantage")
    spans = Tokens(page).spans
    for span, (row, t) in zip(spans, saved_tokens([rec]), strict=True):
        for name, (key, _, _) in QUANTITIES.items():
            value = float(row[key][t])
            assert float(span[f"data-{name}"]) == value or value != value, (name, t)
    assert spans[-1]["data-ratio"] == "NaN"  # JavaScript's Number() reads it; colourless, not an error
    assert '<option value="advantage" selected>' in page and page.count("selected") == 1
    data = json.loads(page.split('id="inspector-data">')[1].split("</script>")[0])
    kl = torch.cat([row["kl"] for row in rec["rows"]])
    assert data["quantities"]["kl"] == {"centre": 0.0, "scale": pytest.approx(float(kl.abs().max()))}
    ratio = rec["rows"][0]["ratio"]  # the NaN left out of the scale
    assert data["quantities"]["ratio"] == {"centre": 1.0, "scale": pytest.approx(float((ratio - 1).abs().max()))}
    assert "raw score <b>0.5000</b>" in page and "beta <b>0.05</b>" in page and "clipfrac" not in page
    with pytest.raises(InspectorError, match="unknown quantity 'entropy'; choose one of kl, value"):
        build_page([rec], color="entropy")


def test_iterations_first_middle_last_by_default_and_missing_ones_listed(tmp_path):
    saved = [1] + list(range(10, 130, 10))
    assert choose_iterations(saved, None) == [1, 60, 120]
    assert choose_iterations([1, 2], None) == [1, 2]
    assert choose_iterations(saved, "all") == saved
    assert choose_iterations(saved, "120, 1,10,1") == [1, 10, 120]
    with pytest.raises(InspectorError, match=r"^iterations 5, 7 not saved; saved: 1, 10, 20, .*, 120$"):
        choose_iterations(saved, "5,10,7")
    with pytest.raises(InspectorError, match="--iterations: expected 'all' or iteration numbers"):
        choose_iterations(saved, "first")
    run = save_run(tmp_path / "ppo_x", [1, 10, 20])
    assert [r["iteration"] for r in inspector.load_run(run)] == [1, 10, 20]


def test_command_line_errors_are_one_line_with_status_2(tmp_path, capsys):
    run = save_run(tmp_path / "ppo_x", [1, 10, 20])
    done = subprocess.run([sys.executable, "inspect_rollouts.py", str(run), "--iterations", "1,5"], cwd=SRC,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["error: iteration 5 not saved; saved: 1, 10, 20"]
    (tmp_path / "sft_y" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ppo_z_20260101-000000" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ppo_empty" / "rollouts").mkdir(parents=True)
    (tmp_path / "ppo_cut" / "rollouts").mkdir(parents=True)
    (tmp_path / "ppo_cut" / "rollouts" / "iteration_000001.pt").write_bytes((run / "rollouts" / "iteration_000001.pt")
                                                                           .read_bytes()[:300])
    for argv, message in [
        ([str(tmp_path / "sft_y")], "not a PPO run folder (no rollouts/ in it)"),
        ([str(tmp_path / "ppo_z_20260101-000000")], "a PPO run without rollouts/"),
        ([str(tmp_path / "ppo_empty")], "no iteration saved yet"),
        ([str(tmp_path / "nowhere")], "no such folder"),
        ([str(tmp_path / "ppo_cut")], "iteration_000001.pt: not a saved rollout record (torch.load failed"),
        ([str(run), "--color", "entropy"], "unknown quantity 'entropy'"),
        ([str(run), "--iterations", "last"], "--iterations: expected"),
        ([str(run), "--colour", "kl"], "unrecognized arguments: --colour"),
        ([str(run), "--out", str(tmp_path / "no" / "page.html")], "cannot write"),
    ]:
        with pytest.raises(SystemExit) as exit:
            inspect_rollouts.main(argv)
        err = capsys.readouterr().err.splitlines()
        assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], argv
    assert not (run / "inspector.html").exists()


def test_screenshot_without_chromium_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(inspector.shutil, "which", lambda name: None)
    with pytest.raises(InspectorError, match="needs chromium and chromedriver"):
        inspector.screenshot(tmp_path / "page.html", tmp_path / "page.png")


@pytest.fixture(scope="module")
def ppo_page(tmp_path_factory):
    """A tiny PPO run (rollouts saved after iterations 1 and 2) and its page from the command line."""
    tmp = tmp_path_factory.mktemp("ppo")
    run = ppo.train(small_cfg(tmp, "--train.max_steps", "3", "--ppo.sample_every", "2"),
                    reward_fn=dollar_share, prompts=prompts())
    done = subprocess.run([sys.executable, "inspect_rollouts.py", str(run)], cwd=SRC, capture_output=True,
                          text=True, timeout=120)
    records = [torch.load(p, weights_only=True) for p in sorted((run / "rollouts").glob("iteration_*.pt"))]
    return run, done, records


def test_page_of_a_real_run_from_the_command_line(ppo_page):
    run, done, records = ppo_page
    assert done.returncode == 0, done.stderr
    assert [r["iteration"] for r in records] == [1, 2]
    tokens = saved_tokens(records)
    assert done.stdout.strip() == (f"wrote {run / 'inspector.html'}: iterations 1, 2, "
                                   f"{sum(len(r['rows']) for r in records)} rows, {len(tokens)} tokens")
    page = (run / "inspector.html").read_text()
    assert "http" not in page and "src=" not in page  # nothing to fetch
    spans = Tokens(page).spans
    assert [s["text"] for s in spans] == [shown(row["tokens"][t]) for row, t in tokens]
    for span, (row, t) in zip(spans, tokens, strict=True):
        assert float(span["data-advantage"]) == float(row["advantages"][t])
        assert float(span["data-ref-logprob"]) == float(row["ref_logprobs"][t])
    assert f"KL <b>{records[1]['scalars']['objective/kl']:.4f}</b>" in page and "clipfrac <b>" in page


@needs_chromium
def test_page_in_headless_chromium(ppo_page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    run, _, records = ppo_page
    tokens = saved_tokens(records)
    driver = inspector.browser(tmp_path / "profile")
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (  # before the page's scripts
            "window.pageErrors = [];"
            "window.addEventListener('error', e => window.pageErrors.push(String(e.message)));")})
        driver.get((run / "inspector.html").as_uri())
        spans = driver.find_elements(By.CSS_SELECTOR, ".tok")
        assert len(spans) == len(tokens)
        texts = driver.execute_script("return Array.from(document.querySelectorAll('.tok'), s => s.textContent)")
        assert "".join(texts) == "".join(shown(row["tokens"][t]) for row, t in tokens)

        tooltip = driver.find_element(By.ID, "tooltip")
        assert not tooltip.is_displayed()
        for i in (0, len(spans) // 2 + 3, len(spans) - 1):
            ActionChains(driver).move_to_element(spans[i]).perform()
            assert tooltip.is_displayed()
            row, t = tokens[i]
            assert tooltip.text.startswith(f"token {t}: {json.dumps(row['tokens'][t])}")
            for name, key in [("kl", "kl"), ("value", "values"), ("advantage", "advantages"), ("ratio", "ratio")]:
                shown_value = float(tooltip.find_element(By.CSS_SELECTOR, f'tr[data-q="{name}"] td:last-child').text)
                assert abs(shown_value - float(row[key][t])) <= 0.5e-4 + 1e-9, (i, name)
        ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
        assert not tooltip.is_displayed()

        i = max(range(len(tokens)), key=lambda i: abs(float(tokens[i][0]["advantages"][tokens[i][1]])))
        before = spans[i].value_of_css_property("background-color")
        Select(driver.find_element(By.ID, "quantity")).select_by_value("advantage")
        after = spans[i].value_of_css_property("background-color")
        red, _, blue = (int(c) for c in after[after.index("(") + 1:].split(",")[:3])
        assert after != before and (red > blue) == (float(tokens[i][0]["advantages"][tokens[i][1]]) > 0), after
        assert driver.execute_script("return window.pageErrors") == []
    finally:
        driver.quit()


@needs_chromium
def test_screenshot_of_the_first_sections(ppo_page, tmp_path):
    run, _, _ = ppo_page
    png = inspector.screenshot(run / "inspector.html", tmp_path / "page.png", max_height=900)
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width == 1200 and 300 < height <= 900 + 16
