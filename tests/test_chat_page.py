"""The chat page at / of the server, in Debian's headless chromium (selenium, the driver path
given, nothing downloaded): type a message, see the reply stream in, reset. Also: the page
loads nothing from another site. `python tests/test_chat_page.py` writes docs/chat_page.png."""

import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serving import serve, tiny_checkpoint  # noqa: E402

from gpt2rlhf import inspector  # noqa: E402
from gpt2rlhf.loading import load  # noqa: E402
from gpt2rlhf.serving import ServerSettings, build_app  # noqa: E402
from gpt2rlhf.tokenizer import get_tokenizer  # noqa: E402

HAVE_CHROMIUM = bool(shutil.which("chromium") and shutil.which("chromedriver"))
needs_chromium = pytest.mark.skipif(not HAVE_CHROMIUM, reason="no chromium and chromedriver on PATH "
                                    "(Debian: apt-get install chromium chromium-driver)")
PAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2rlhf" / "static" / "chat.html"


def test_the_page_loads_nothing_from_elsewhere():
    page = PAGE.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "cdn" not in page.lower() and "@import" not in page


def chat_in_browser(folder: Path, key: str, png: Path | None = None, settings=(("temperature", "0"), ("max_tokens", "60"))):
    """Serve the tiny model, chat on its page, reset; optionally a screenshot before the reset."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = load(tiny_checkpoint(folder), kind="lm").eval()
    url, srv, thread = serve(build_app(model, get_tokenizer(), ServerSettings(model_name="tiny-gpt2", api_key=key)))
    driver = inspector.browser(folder / "profile", width=900, height=700)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (  # before the page's scripts
            "window.pageErrors = [];"
            "window.addEventListener('error', e => window.pageErrors.push(String(e.message)));")})
        driver.get(url + "/")
        driver.find_element(By.ID, "key").send_keys(key)
        # 60 tokens a reply: the second question no longer fits the 128-token context with the
        # first exchange, so the page drops that exchange from what it sends, as chat.py does
        for field, value in settings:
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "input").send_keys("Hello, who are you?\n")  # Enter sends
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done], .msg.error"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), driver.find_element(By.ID, "log").text
        user = driver.find_element(By.CSS_SELECTOR, ".msg.user .text").text
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .text").text
        chunks = driver.execute_script("return window.chunksSeen")
        driver.find_element(By.ID, "input").send_keys("And then?\n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) == 2)
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), driver.find_element(By.ID, "log").text
        sent = driver.execute_script("return messages.map(m => m.role)")
        if png:
            driver.save_screenshot(str(png))
        messages_before_reset = len(driver.find_elements(By.CSS_SELECTOR, ".msg"))
        driver.find_element(By.ID, "reset").click()
        after_reset = len(driver.find_elements(By.CSS_SELECTOR, ".msg"))
        return {"user": user, "reply": reply, "chunks": chunks, "before": messages_before_reset,
                "after": after_reset, "model": driver.find_element(By.ID, "model").text,
                "errors": driver.execute_script("return window.pageErrors"),
                "sent": sent}
    finally:
        driver.quit()
        srv.should_exit = True
        thread.join(timeout=10)


@needs_chromium
def test_type_a_message_see_the_reply_stream_in_and_reset(tmp_path):
    seen = chat_in_browser(tmp_path, key="page-key")
    assert seen["model"] == "tiny-gpt2"  # /v1/models answered with the key typed in
    assert seen["user"] == "Hello, who are you?"
    assert seen["reply"] and seen["chunks"] > 3  # several deltas: it streamed
    assert seen["before"] == 4 and seen["after"] == 0
    assert seen["sent"] == ["user", "assistant"]  # the first exchange dropped at the context limit
    assert seen["errors"] == []


if __name__ == "__main__":  # the README's screenshot
    out = Path(__file__).resolve().parents[1] / "docs" / "chat_page.png"
    with tempfile.TemporaryDirectory() as tmp:
        print(chat_in_browser(Path(tmp), key="k", png=out, settings=(("temperature", "1"), ("max_tokens", "20"))))
    print(f"wrote {out}")
