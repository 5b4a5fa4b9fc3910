"""orq-proxy: attribute, budget and report LLM usage per identity, as a composable ASGI middleware stack."""

from __future__ import annotations

__version__ = "0.1.0"
