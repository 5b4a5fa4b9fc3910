"""Test helpers shipped with the package: a fake clock, a scripted forwarder and an OpenAI-compatible fake
upstream."""

from __future__ import annotations

from orq_proxy.testing.clock import FakeClock
from orq_proxy.testing.forwarder import ScriptedAnswer, ScriptedForwarder

__all__ = ["FakeClock", "ScriptedAnswer", "ScriptedForwarder"]
