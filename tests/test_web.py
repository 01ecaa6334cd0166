"""The web page in a real headless Chromium: ghost completions, streamed chat, live status, the API key prompt."""

import json
import shutil

import httpx
import pytest

from midfill.model.checkpoint import load_model
from midfill.server.background import running_server
from midfill.tokenizer import load_tokenizer

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
# As root, in a closed network: no sandbox, and none of Chromium's background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.errors = []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()


def test_ghost_completion_appears_and_tab_accepts_it(tiny, page):
    with running_server(*tiny) as (url, _):
        bodies = []
        page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/code-completion") else None)
        page.goto(url + "/")
        page.click("#code")
        page.keyboard.press("Control+End")
        page.keyboard.type("value = ", delay=30)
        page.wait_for_function("document.querySelector('#mirror .ghost').textContent.length > 0")
        ghost = page.inner_text("#mirror .ghost")
        assert "ms" in page.inner_text("#latency")
        before = page.input_value("#code")
        page.keyboard.press("Tab")
        assert page.input_value("#code") == before + ghost
        assert bodies[-1]["inputs"]["multiline"] is False and bodies[-1]["inputs"]["cursor"]["line"] == 2

        page.check("input[value=multi]")
        page.click("#code")
        page.keyboard.press("Control+End")
        page.keyboard.type("\nitems = ", delay=30)
        page.wait_for_function("document.querySelector('#mirror .ghost').textContent.length > 0")
        assert bodies[-1]["inputs"]["multiline"] is True
        page.keyboard.press("Escape")
        assert page.inner_text("#mirror .ghost") == ""
        assert page.errors == []


def test_chat_streams_an_answer(tiny, page):
    with running_server(*tiny) as (url, _):
        streamed = []
        page.on("response", lambda r: streamed.append(r.headers.get("content-type", "")) if "chat/completions" in r.url else None)
        page.goto(url + "/")
        page.keyboard.press("Alt+2")
        page.fill("#chat-input", "Write a function that adds two numbers.")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll('.message.assistant').length === 1 && !document.querySelector('#send').disabled")
        answer = page.inner_text(".message.assistant .body")
        assert answer.strip() and answer != "…" and page.locator(".message.assistant .error").count() == 0
        assert page.inner_text(".message.user .body") == "Write a function that adds two numbers."
        assert streamed and streamed[0].startswith("text/event-stream")
        assert page.errors == []


def test_status_numbers_change_after_a_request(tiny, page):
    with running_server(*tiny) as (url, _):
        page.goto(url + "/")
        page.keyboard.press("Alt+3")
        page.wait_for_selector("[data-stat=tokens_total]")
        assert page.inner_text("[data-stat=tokens_total]") == "0"
        assert page.inner_text("[data-stat=model]") == "tiny" and page.inner_text("[data-stat=device]") == "cpu"
        httpx.post(url + "/v1/completions", json={"prompt": "def f(x):", "max_tokens": 5, "temperature": 0}, timeout=60)
        page.wait_for_function("document.querySelector('[data-stat=tokens_total]').textContent !== '0'", timeout=10_000)
        assert int(page.inner_text("[data-stat=tokens_total]")) > 0
        assert page.inner_text("[data-stat=tokens_per_s]") != "–" and page.inner_text("[data-stat=ttft_ms]").endswith("ms")
        assert page.errors == []


def test_finetune_progress_is_shown(tiny, page, tmp_path):
    (tmp_path / "progress.json").write_text(json.dumps({"state": "running", "step": 40, "total": 100, "loss": 2.5,
                                                        "test_loss": 2.7, "eta_s": 90}))  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "val_loss": 3.0}, {"step": 20, "loss": 2.8}, {"step": 20, "val_loss": 2.9}, {"step": 40, "val_loss": 2.7}]))  # fmt: skip
    with running_server(*tiny, finetune_run=str(tmp_path)) as (url, _):
        page.goto(url + "/")
        page.keyboard.press("Alt+3")
        page.wait_for_selector("[data-stat=ft_step]")
        assert page.inner_text("[data-stat=ft_step]") == "40 / 100"
        assert page.locator("#curve polyline").count() == 2


def test_api_key_is_asked_for_once(tiny, page):
    with running_server(*tiny, api_key="s3cret") as (url, _):
        page.goto(url + "/")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong")
        page.keyboard.press("Enter")
        page.wait_for_selector("#key-error:not([hidden])")
        page.fill("#key-input", "s3cret")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#model-name').textContent.startsWith('tiny')")
        page.click("#code")
        page.keyboard.press("Control+End")
        page.keyboard.type("x = ", delay=30)
        page.wait_for_function("document.querySelector('#mirror .ghost').textContent.length > 0")
        page.reload()  # remembered: no second prompt
        page.wait_for_function("document.querySelector('#model-name').textContent.startsWith('tiny')")
        assert not page.is_visible("#key-dialog")
        # 401s from the wrong key show up as console errors of the failed fetches; nothing else may
        assert all("401" in e for e in page.errors)
