"""The chat page in headless Chromium (Debian's package, driven by Playwright; no browser download):
send a message, see the reply and the trait display, pin a trait with the sliders and check the
weights the server reports follow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import build_tiny
from personafuse.serving import ServeConfig, create_app
from personafuse.traits import TRAIT_POLES
from serve_support import CHROMIUM, CHROMIUM_ARGS, LiveServer

torch.set_num_threads(1)
ARTIFACTS = Path(os.environ.get("PERSONAFUSE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        # A persistent context is how Playwright takes a fresh --user-data-dir.
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 800}
        )
        yield ctx
        ctx.close()


def weights_shown(page) -> dict[str, float]:
    return page.eval_on_selector_all(
        "#traits rect[data-pole]", "els => Object.fromEntries(els.map(e => [e.dataset.pole, Number(e.dataset.weight)]))"
    )


def test_chat_page_reply_traits_and_sliders(browser):
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=32, default_max_tokens=8)
    model = build_tiny()
    with LiveServer(create_app(model, cfg)) as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.fill("#maxtokens", "8")
        page.fill("#input", "i am so anxious about my exam")
        page.click("#send")
        page.wait_for_selector(".msg.assistant.done", timeout=30_000)
        reply = page.inner_text(".msg.assistant .text")
        assert reply and reply != "…"
        routed = weights_shown(page)
        want = dict(zip(TRAIT_POLES, model.route(["i am so anxious about my exam"])[0].tolist(), strict=True))
        assert routed == pytest.approx(want, abs=2e-3)  # the router's weights for the message, as drawn
        assert page.evaluate("window.personafuse.lastPersona.mode") == "router"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_router.png"))

        # Pin Agreeableness: fixed mode, every slider at 0 except high_A.
        page.check("input[name=mode][value=fixed]")
        page.evaluate(
            """() => document.querySelectorAll('#sliders input').forEach(s => {
                 s.value = s.dataset.pole === 'high_A' ? 80 : 0; s.dispatchEvent(new Event('input')); })"""
        )
        page.fill("#input", "what is two plus three")
        page.click("#send")
        page.wait_for_selector(".msg.assistant.done >> nth=1", timeout=30_000)
        pinned = weights_shown(page)
        assert pinned["high_A"] == pytest.approx(1.0) and sum(pinned.values()) == pytest.approx(1.0)
        assert page.evaluate("window.personafuse.lastPersona")["weights"]["high_A"] == 1.0

        # Blend: half router, half the slider mixture -> high_A between the two.
        page.check("input[name=mode][value=blend]")
        page.fill("#input", "thanks")
        page.click("#send")
        page.wait_for_selector(".msg.assistant.done >> nth=2", timeout=30_000)
        blended = weights_shown(page)
        # 0.5 * router + 0.5 * sliders: high_A at least 0.5, every other pole gets the router's half.
        assert 0.5 <= blended["high_A"] < 1.0
        assert all(v > 0 for p, v in blended.items() if p != "high_A")
        assert page.evaluate("window.personafuse.lastPersona")["alpha"] == 0.5
        assert len(page.query_selector_all(".msg.assistant .mini")) == 3  # one small chart per reply
        page.screenshot(path=str(ARTIFACTS / "chat_pinned.png"))

        # A bad mixture (all sliders at zero) shows the server's message and the page keeps working.
        page.check("input[name=mode][value=fixed]")
        page.evaluate("() => document.querySelectorAll('#sliders input').forEach(s => { s.value = 0; })")
        page.fill("#input", "hello")
        page.click("#send")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
        assert "zero" in page.inner_text("#error")
        page.close()

