"""/docs in a real headless Chromium against a real uvicorn process: the page
renders from the package's own assets (no CDN), lists every loss, and each
loss's example, sent as is with "Try it out", returns 200."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from service.losses import LOSSES

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
    block = docs.locator(f"#operations-v1-post_{name}")
    block.locator(".opblock-summary").click()
    block.get_by_role("button", name="Try it out").click()
    block.get_by_role("button", name="Execute").click()
    status = block.locator(".live-responses-table tr.response .response-col_status").first
    expect(status).to_have_text("200", timeout=15_000)
    block.locator(".opblock-summary").click()  # collapse again
