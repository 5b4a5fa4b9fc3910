"""Test helpers shipped with the package: a fake clock and an OpenAI-compatible fake upstream."""

from __future__ import annotations

from orq_proxy.testing.clock import FakeClock

__all__ = ["FakeClock"]
