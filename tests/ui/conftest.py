"""The dashboard's browser tests: a real `orq-proxy serve` in front of the fake upstream, and Debian's
Chromium driven by Playwright (one browser for the module; a fresh page, so a fresh sessionStorage, per test).

A page fails its test if it opens any JavaScript dialog (`alert`, `confirm`: the XSS canary), throws an
uncaught error, or logs a console error (a Content-Security-Policy violation is one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from orq_proxy.testing.fake_upstream import FakeUpstream
from orq_proxy.testing.servers import ServerThread
from tests.ui.support import CHROMIUM, CHROMIUM_ARGS, Proxy, free_port, write_config


@pytest.fixture(scope="module")
def proxy(
    fake_server: tuple[FakeUpstream, ServerThread], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """A real `orq-proxy serve` (its own process and socket) in front of the session's fake upstream."""
    folder = tmp_path_factory.mktemp("ui-proxy")
    config = write_config(folder / "orq-proxy.toml", fake_server[1].url)
    log = (folder / "serve.log").open("wb")  # a file, not a pipe nobody reads (a full pipe blocks the server)
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "orq_proxy", "serve", "--config", str(config)),
            *("--port", str(port), "--log-level", "warning"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.close()
            raise AssertionError("orq-proxy serve did not start:\n" + (folder / "serve.log").read_text())
        time.sleep(0.05)
    running = Proxy(url=url, proc=proc)
    try:
        yield running
    finally:
        running.admin.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        output = (folder / "serve.log").read_text()
        assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's Chromium with a fresh profile, for the module (Playwright's own download is not used)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
            accept_downloads=True,
        )
        context.set_default_timeout(5000)
        try:
            yield context
        finally:
            context.close()


_HTTP_STATUS_LOG = "Failed to load resource: the server responded with a status of"


@dataclass
class Watch:
    """What a page did that a test must never see."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A new tab (empty sessionStorage); fails the test on any dialog, page error or console error."""
    tab = browser.new_page()
    watch = Watch()

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    tab.on("dialog", on_dialog)
    tab.on("pageerror", lambda exc: watch.errors.append(f"page error: {exc}"))

    def on_console(message: Any) -> None:
        # A refused API call (the non-admin key's 403) is logged by Chromium itself; the page handles it.
        if message.type == "error" and not message.text.startswith(_HTTP_STATUS_LOG):
            watch.errors.append(f"console: {message.text}")

    tab.on("console", on_console)
    try:
        yield tab
    finally:
        tab.close()
    assert watch.dialogs == [], f"the page opened dialogs: {watch.dialogs}"
    assert watch.errors == [], f"the page reported errors: {watch.errors}"
