"""Pick the upstream for a request from its model name.

`"model": "openai/gpt-4o"` goes to upstream `openai` as `"model": "gpt-4o"`; a bare name goes to the
default upstream; a prefix that names no configured upstream is a 400 that lists the configured ones.
Requests without a JSON `model` (GET /models, multipart uploads) go to the default upstream.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.context import get_context
from orq_proxy.errors import openai_error

__all__ = ["MAX_MODEL_CHARS", "RoutingMiddleware"]

# Real model ids (provider refs, deployment names, ARNs) are far shorter.
MAX_MODEL_CHARS = 512


class RoutingMiddleware:
    """Sets `ctx.provider`, `ctx.model` (as forwarded) and `ctx.model_ref` (`provider/model`).

    Args:
        app: the next layer.
        upstreams: the configured upstream names.
        default: where bare model names go (None: a bare name is a 400).
    """

    def __init__(self, app: ASGIApp, *, upstreams: Iterable[str], default: str | None) -> None:
        self.app = app
        self.upstreams = frozenset(upstreams)
        if not self.upstreams:
            raise ValueError("at least one upstream must be configured")
        if default is not None and default not in self.upstreams:
            raise ValueError(f"default upstream {default!r} is not configured")
        self.default = default
        self._names = ", ".join(sorted(self.upstreams))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        body = ctx.body
        model = body.get("model") if body is not None else None
        problem: tuple[str, str] | None = None  # (message, code) of a 400 with param "model"
        if model is None:
            ctx.provider = self.default or sorted(self.upstreams)[0]
        elif not isinstance(model, str) or not model:
            problem = "model must be a non-empty string", "invalid_value"
        elif len(model) > MAX_MODEL_CHARS:
            # The name becomes a metrics label and part of every usage event: keep it a name.
            problem = f"model must be at most {MAX_MODEL_CHARS} characters, got {len(model)}", "invalid_value"
        else:
            prefix, slash, rest = model.partition("/")
            if slash and (prefix not in self.upstreams or not rest):
                problem = (
                    f"unknown provider {prefix!r} in model {model!r}; configured providers: {self._names}",
                    "unknown_provider",
                )
            elif slash:
                ctx.provider = prefix
                ctx.model = rest
                body["model"] = rest  # type: ignore[index]
                ctx.body_changed = True
            elif self.default is None:
                problem = (
                    f"model {model!r} has no provider prefix and no default upstream is configured; "
                    f"use one of: {self._names} (e.g. {sorted(self.upstreams)[0]}/{model})",
                    "unknown_provider",
                )
            else:
                ctx.provider = self.default
                ctx.model = model
            if problem is None:
                ctx.model_ref = f"{ctx.provider}/{ctx.model}"
        if problem is not None:
            await openai_error(400, problem[0], code=problem[1], param="model")(scope, receive, send)
            return
        await self.app(scope, receive, send)
