"""/docs in a real headless Chromium against a real uvicorn process: the page
renders from the package's own assets (no CDN), lists every loss, and each
loss's example, sent as is with "Try it out", returns 200; the cross_entropy
example shows torch's value (1.3133) in the response panel, and a screenshot
of it is written to artifacts/ (LOSS_SERVICE_ARTIFACTS overrides the folder)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from playwright.sync_api import Browser, Page, expect, sync_playwright

from service.losses import LOSSES

ARTIFACTS = Path(
    os.environ.get("LOSS_SERVICE_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts")
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def docs(browser: Browser, live_server: str) -> Iterator[Page]:
    page = browser.new_page()
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(live_server) else external.append(r.url))
    page.goto(f"{live_server}/docs")
    expect(page.locator(".opblock").first).to_be_visible(timeout=30_000)
    assert not [u for u in external if u.startswith("http")], external
    yield page
    page.close()


def test_docs_lists_every_loss(docs: Page) -> None:
    paths = docs.locator(".opblock-summary-path").all_inner_texts()
    flat = {p.replace("\u200b", "").strip() for p in paths}
    for name in LOSSES:
        assert f"/v1/losses/{name}" in flat, name


@pytest.mark.parametrize("name", list(LOSSES))
def test_try_it_out_with_the_example_returns_200(docs: Page, name: str) -> None:
    block = docs.locator(f"#operations-v1-{name}")
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    status = block.locator(".live-responses-table tr.response .response-col_status").first
    expect(status).to_have_text("200", timeout=15_000)
    block.locator(".opblock-summary").click()  # collapse again


def test_cross_entropy_example_shows_torch_value_and_is_screenshotted(
    browser: Browser, live_server: str
) -> None:
    docs = browser.new_page(viewport={"width": 1280, "height": 800})  # its own, untouched page
    docs.goto(f"{live_server}/docs")
    example = LOSSES["cross_entropy"].example
    logits, labels = torch.tensor(example["input"]).float(), torch.tensor(example["target"])
    expected = F.cross_entropy(logits, labels)
    block = docs.locator("#operations-v1-cross_entropy")
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    body = block.locator(".live-responses-table .response-col_description .microlight").first
    expect(body).to_contain_text('"value"', timeout=15_000)
    shown = json.loads(body.inner_text())
    assert shown["value"] == expected.item()
    assert f"{shown['value']:.4f}" == "1.3133"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "docs-cross_entropy.png"
    body.scroll_into_view_if_needed()
    docs.mouse.wheel(0, 250)  # the response panel and the code/status line above it
    docs.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    docs.close()
