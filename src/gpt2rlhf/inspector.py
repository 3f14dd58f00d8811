"""The per-token inspector of a PPO run: the rollouts it saved (rollouts/iteration_*.pt,
written by PPOLab.save_rollouts) as one self-contained HTML page where each response
token is coloured by one quantity (KL, value, advantage, ...) and shows all of them on
hover. Seeing where in a response the KL, the reward or the advantage sits is what the
run's averages in TensorBoard cannot show. src/inspect_rollouts.py is its command line."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .files import write_atomic
from .runs import run_stage


class InspectorError(ValueError):
    """Bad input to the inspector (no such run, iteration or quantity); the message says which."""


# name: (key in a saved row, what it is, the value coloured white)
QUANTITIES = {
    "kl": ("kl", "per-token KL: log pi(token) - log pi_ref(token), policy against the frozen reference", 0.0),
    "value": ("values", "the critic's V: the return it expects from this token on", 0.0),
    "advantage": ("advantages", "whitened GAE advantage: how much better the token did than V expected", 0.0),
    "reward": ("rewards", "-beta * KL on every token, plus the (normalised) score on the last one", 0.0),
    "ratio": ("ratio", "pi_after_update / pi_rollout: how far this iteration's update moved the token's "
                       "probability (white at 1)", 1.0),
    "return": ("returns", "advantage (before whitening) + value: the critic's target", 0.0),
    "logprob": ("logprobs", "log pi(token) under the policy that sampled it", 0.0),
    "ref-logprob": ("ref_logprobs", "log pi_ref(token) under the frozen reference model", 0.0),
}
HEADLINE = (("raw score", "objective/raw_score", ".4f"), ("KL", "objective/kl", ".4f"),
            ("beta", "objective/kl_coef", ".4g"), ("clipfrac", "policy/clipfrac", ".3f"))
ROLLOUT_FILE = re.compile(r"^iteration_(\d+)\.pt$")
VISIBLE = str.maketrans({"\n": "\u21b5", "\r": "\u240d", "\t": "\u2192"})  # newline as ↵, CR as ␍, tab as →


def check_quantity(name: str) -> str:
    if name not in QUANTITIES:
        raise InspectorError(f"unknown quantity {name!r}; choose one of {', '.join(QUANTITIES)}")
    return name


def saved_iterations(run_dir: Path) -> dict[int, Path]:
    """{iteration: file} of the rollouts a PPO run saved, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InspectorError(f"{run_dir}: no such folder")
    folder = run_dir / "rollouts"
    if not folder.is_dir():
        if run_stage(run_dir) == "ppo":
            raise InspectorError(f"{run_dir}: a PPO run without rollouts/ (they are saved every "
                                 f"ppo.sample_every iterations and after the first; was it 0?)")
        raise InspectorError(f"{run_dir}: not a PPO run folder (no rollouts/ in it)")
    saved = {int(m.group(1)): p for p in folder.iterdir() if (m := ROLLOUT_FILE.match(p.name))}
    if not saved:
        raise InspectorError(f"{folder}: no iteration saved yet")
    return dict(sorted(saved.items()))


def choose_iterations(saved: list[int], spec: str | None) -> list[int]:
    """The iterations to show: 'all', a comma-separated list, or by default the first,
    middle and last saved ones."""
    if spec is None:
        return sorted({saved[0], saved[len(saved) // 2], saved[-1]})
    if spec.strip() == "all":
        return list(saved)
    try:
        wanted = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        raise InspectorError(f"--iterations: expected 'all' or iteration numbers separated by commas, "
                             f"got {spec!r}") from None
    missing = [i for i in wanted if i not in saved]
    if missing:
        raise InspectorError(f"iteration{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} "
                             f"not saved; saved: {', '.join(map(str, saved))}")
    return wanted


def load_record(path: Path) -> dict:
    """One saved iteration. A cut-short or foreign file can fail anywhere in the unpickler,
    with any exception (torch's message then suggests weights_only=False, which we never
    want): each becomes one line naming the file."""
    try:
        record = torch.load(path, weights_only=True)
    except Exception as e:
        raise InspectorError(f"{path}: not a saved rollout record (torch.load failed with {type(e).__name__}; "
                             f"cut short, or not written by a PPO run?)") from None
    if not isinstance(record, dict) or not {"iteration", "rows", "scalars"} <= record.keys():
        raise InspectorError(f"{path}: not a saved rollout record (a dict with iteration, rows and scalars)")
    return record


def load_run(run_dir: Path, iterations: str | None = None) -> list[dict]:
    """The saved records of the chosen iterations (see choose_iterations)."""
    saved = saved_iterations(run_dir)
    return [load_record(saved[i]) for i in choose_iterations(list(saved), iterations)]


def number(x: float) -> str:
    """A float as JavaScript's Number() reads it back exactly (NaN and infinities too)."""
    return repr(x) if math.isfinite(x) else {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[repr(x)]


def shown(text: str) -> str:
    """Token or prompt text with newlines and tabs made visible."""
    return text.translate(VISIBLE)


def escape(text: str) -> str:
    """HTML text or attribute value, ASCII only (other characters as references): the page
    reads the same whatever encoding the locale writes files in."""
    return html.escape(text, quote=True).encode("ascii", "xmlcharrefreplace").decode()


def token_span(row: dict, t: int) -> str:
    values = " ".join(f'data-{name}="{number(float(row[key][t]))}"' for name, (key, _, _) in QUANTITIES.items())
    return (f'<span class="tok" data-token-index="{t}" data-token="{escape(row["tokens"][t])}" {values}>'
            f'{escape(shown(row["tokens"][t]))}</span>')


def section(record: dict) -> str:
    scalars = record["scalars"]
    headline = " &middot; ".join(f"{label} <b>{format(scalars[key], spec)}</b>"
                                 for label, key, spec in HEADLINE if key in scalars)
    rows = "\n".join(
        f'<div class="row"><span class="prompt">{escape(shown(row["prompt"]))}</span>'
        + "".join(token_span(row, t) for t in range(len(row["tokens"])))
        + f'<span class="score">raw score {row["raw_score"]:+.4f}</span></div>' for row in record["rows"])
    n = record["iteration"]
    return (f'<section id="iteration-{n}">\n<h2>Iteration {n}</h2>\n<p class="scalars">{headline}</p>\n'
            f'{rows}\n</section>')


def scales(records: list[dict]) -> dict:
    """Per quantity: the value coloured white and the largest distance from it on the page
    (1 where all are equal), which is full colour."""
    out = {}
    for name, (key, _, centre) in QUANTITIES.items():
        values = [torch.as_tensor(row[key]).double() - centre for r in records for row in r["rows"]]
        values = torch.cat(values) if values else torch.zeros(0)
        values = values[values.isfinite()]
        scale = float(values.abs().max()) if values.numel() else 0.0
        out[name] = {"centre": centre, "scale": scale or 1.0}
    return out


def build_page(records: list[dict], color: str = "kl", title: str = "PPO rollouts") -> str:
    """One HTML file, inline CSS and JavaScript, nothing fetched: the given iterations'
    rows with every response token coloured by `color`, switchable on the page."""
    check_quantity(color)
    options = "".join(f'<option value="{n}"{" selected" * (n == color)}>{n}</option>' for n in QUANTITIES)
    about = "".join(f"<dt>{n}</dt><dd>{escape(text)}</dd>" for n, (_, text, _) in QUANTITIES.items())
    data = json.dumps({"quantities": scales(records)}).replace("</", "<\\/")
    sections = "\n".join(section(r) for r in records)
    return PAGE.format(title=escape(title), options=options, about=about, sections=sections, data=data,
                       style=STYLE, script=SCRIPT)


def write_page(run_dir: Path, records: list[dict], color: str, out: Path | None = None) -> Path:
    out = Path(out) if out else Path(run_dir) / "inspector.html"
    try:
        write_atomic(out, build_page(records, color, f"PPO rollouts: {Path(run_dir).resolve().name}"))
    except OSError as e:
        raise InspectorError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def browser(profile: Path, width: int = 1200, height: int = 900):
    """Headless Debian chromium under selenium, offline: the given binaries (never Selenium
    Manager, which would download a driver), no background network, a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        raise InspectorError("a screenshot needs chromium and chromedriver on PATH "
                             "(Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-quic", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def screenshot(page: Path, png: Path, width: int = 1200, max_height: int = 2400) -> Path:
    """A PNG of the page `width` pixels wide, as tall as the first sections that fit in
    max_height (the first one, cut there, if it alone is taller). In 256 colours: the same
    to the eye at a third of the size, small enough to commit to docs/."""
    from PIL import Image  # matplotlib's dependency
    try:
        from selenium.common.exceptions import WebDriverException
    except ImportError:
        raise InspectorError("a screenshot needs selenium (pip install selenium)") from None
    with tempfile.TemporaryDirectory() as profile:
        try:
            driver = browser(Path(profile), width)
            try:
                driver.get(Path(page).resolve().as_uri())
                bottoms = driver.execute_script("return Array.from(document.querySelectorAll('section'), "
                                                "s => s.getBoundingClientRect().bottom + window.scrollY)")
                fits = [b for b in bottoms if b <= max_height]
                height = max(fits) if fits else max_height
                shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
                    "format": "png", "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": width, "height": math.ceil(height) + 16, "scale": 1}})
            finally:
                driver.quit()
        except WebDriverException as e:
            raise InspectorError(f"chromium failed: {str(e.msg or e).splitlines()[0]}") from None
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE).save(png, optimize=True)
    return Path(png)


STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; color: #222; max-width: 1160px; margin: 0 auto; padding: 0 16px 32px; }
h1 { font-size: 20px; margin: 12px 0 4px; } h2 { font-size: 17px; margin: 18px 0 2px; }
.about { font-size: 13px; color: #444; margin: 4px 0; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0 12px; font-size: 13px; margin: 4px 0; }
dt { font-weight: 600; } dd { margin: 0; color: #444; }
.controls { position: sticky; top: 0; z-index: 5; background: #fff; padding: 6px 0; border-bottom: 1px solid #ddd;
  display: flex; gap: 16px; align-items: center; font-size: 14px; }
.bar { display: inline-block; width: 160px; height: 12px; margin: 0 6px; vertical-align: middle; border: 1px solid #bbb;
  background: linear-gradient(to right, rgb(33,102,172), #fff, rgb(214,39,40)); }
.scalars { margin: 0 0 6px; font-size: 14px; color: #333; }
.row { white-space: pre-wrap; line-height: 1.9; padding: 4px 0; border-bottom: 1px solid #eee; }
.prompt { color: #999; }
.tok { border-radius: 2px; box-shadow: inset -1px 0 rgba(0,0,0,.13); cursor: default; }
.score { margin-left: 8px; padding: 0 5px; font-size: 12px; background: #f1f1f1; border-radius: 3px;
  white-space: nowrap; }
#tooltip { position: absolute; z-index: 10; pointer-events: none; background: #fff; border: 1px solid #999;
  box-shadow: 0 2px 8px rgba(0,0,0,.2); padding: 5px 8px; font: 12px/1.4 ui-monospace, monospace; }
#tooltip[hidden] { display: none; }
#tooltip td { text-align: right; padding-left: 12px; }
#tooltip td:first-child { text-align: left; padding-left: 0; color: #555; }
"""

SCRIPT = """
(() => {
  const data = JSON.parse(document.getElementById('inspector-data').textContent);
  const select = document.getElementById('quantity');
  const tooltip = document.getElementById('tooltip');
  const tokens = document.querySelectorAll('.tok');
  const fmt = v => Number.isFinite(v) ? v.toFixed(4) : String(v);
  function paint(name) {
    const q = data.quantities[name];
    for (const span of tokens) {
      const t = Math.max(-1, Math.min(1, (Number(span.getAttribute('data-' + name)) - q.centre) / q.scale));
      if (!Number.isFinite(t)) { span.style.background = '#ccc'; span.style.color = ''; continue; }
      const [r, g, b] = t >= 0 ? [214, 39, 40] : [33, 102, 172], a = Math.abs(t);
      const mix = c => Math.round(255 + (c - 255) * a);
      span.style.background = `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`;
      span.style.color = a > 0.6 ? '#fff' : '';
    }
    const p = v => (v >= 0 ? '+' : '') + v.toPrecision(3);
    document.getElementById('legend-lo').textContent = p(q.centre - q.scale);
    document.getElementById('legend-hi').textContent = p(q.centre + q.scale);
    document.getElementById('legend-mid').textContent =
      `white at ${q.centre}; full colour at \\u00b1${q.scale.toPrecision(3)}, the largest on this page`;
  }
  select.addEventListener('change', () => paint(select.value));
  document.addEventListener('mouseover', e => {
    const span = e.target.closest && e.target.closest('.tok');
    if (!span) return;
    const head = document.createElement('div');
    const token = JSON.stringify(span.getAttribute('data-token'));
    head.textContent = `token ${span.getAttribute('data-token-index')}: ${token}`;
    const table = document.createElement('table');
    for (const name of Object.keys(data.quantities)) {
      const tr = table.insertRow();
      tr.setAttribute('data-q', name);
      tr.insertCell().textContent = name;
      tr.insertCell().textContent = fmt(Number(span.getAttribute('data-' + name)));
    }
    tooltip.replaceChildren(head, table);
    tooltip.hidden = false;
    const box = span.getBoundingClientRect();
    const right = document.documentElement.clientWidth - tooltip.offsetWidth - 4;
    tooltip.style.left = Math.max(0, Math.min(box.left, right)) + window.scrollX + 'px';
    tooltip.style.top = box.bottom + window.scrollY + 4 + 'px';
  });
  document.addEventListener('mouseout', e => {
    if (e.target.closest && e.target.closest('.tok')) tooltip.hidden = true;
  });
  paint(select.value);
})();
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
<h1>{title}</h1>
<p class="about">Each saved rollout: the prompt in grey, then every response token coloured by one quantity
(blue below, red above the white point), then the row's raw score. Hover a token for all its quantities;
&#8629; is a newline, &#8594; a tab.</p>
<dl>{about}</dl>
<div class="controls"><label>colour by <select id="quantity">{options}</select></label>
<span id="legend"><span id="legend-lo"></span><span class="bar"></span><span id="legend-hi"></span></span>
<span id="legend-mid"></span></div>
{sections}
<div id="tooltip" hidden></div>
<script type="application/json" id="inspector-data">{data}</script>
<script>{script}</script>
</body></html>
"""
