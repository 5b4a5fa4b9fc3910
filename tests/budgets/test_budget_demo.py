"""`orq-proxy demo` shows a budget refusing a request with 429."""

from __future__ import annotations

from orq_proxy.demo import run_demo


def test_demo_shows_a_budget_429() -> None:
    """The budget step lets requests through, then prints a 429 budget_exceeded with Retry-After."""
    lines: list[str] = []
    assert run_demo(out=lines.append) == 0, lines
    text = "\n".join(lines)
    assert "request 1: 200" in text
    assert "429 budget_exceeded: Budget exceeded for identity bob" in text
    assert "Retry-After:" in text and "requests in the last minute" in text
