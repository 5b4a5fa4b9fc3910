"""Pick the upstream for a request from its model name.

`"model": "openai/gpt-4o"` goes to upstream `openai` as `"model": "gpt-4o"`; a bare name goes to the
default upstream; a prefix that names no configured upstream is a 400 that lists the configured ones.
Requests without a JSON `model` (GET /models, multipart uploads) go to the default upstream.

Anthropic Messages calls (`ctx.api == "anthropic"`) only go to upstreams with `api = "anthropic"`: a bare
name to the default one of those, a prefix to the upstream it names, which must be one of them.
Azure-style paths (`/openai/deployments/{deployment}/...`) name the model in the path: the deployment
name, or, when an `api = "azure"` upstream maps a model to that deployment, `upstream/model`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from orq_proxy.context import RequestContext, get_context
from orq_proxy.errors import openai_error

__all__ = ["MAX_MODEL_CHARS", "RoutingMiddleware"]

# Real model ids (provider refs, deployment names, ARNs) are far shorter.
MAX_MODEL_CHARS = 512


class RoutingMiddleware:
    """Sets `ctx.provider`, `ctx.model` (as forwarded) and `ctx.model_ref` (`provider/model`).

    Args:
        app: the next layer.
        upstreams: the configured upstream names.
        default: where bare model names of OpenAI-format calls go (None: a bare name is a 400).
        apis: upstream name -> its `api` (`openai`, `anthropic`, `azure`); unnamed ones are `openai`.
        anthropic_default: where bare model names of Anthropic Messages calls go (None: a 400).
        deployments: Azure deployment name -> `upstream/model` (from the `api = "azure"` upstreams'
            `deployments`), for Azure-style incoming paths.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        upstreams: Iterable[str],
        default: str | None,
        apis: Mapping[str, str] | None = None,
        anthropic_default: str | None = None,
        deployments: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.upstreams = frozenset(upstreams)
        if not self.upstreams:
            raise ValueError("at least one upstream must be configured")
        if default is not None and default not in self.upstreams:
            raise ValueError(f"default upstream {default!r} is not configured")
        self.default = default
        self.apis = {name: (apis or {}).get(name, "openai") for name in self.upstreams}
        self.anthropic = frozenset(name for name, api in self.apis.items() if api == "anthropic")
        if anthropic_default is not None and anthropic_default not in self.anthropic:
            raise ValueError(f'anthropic default {anthropic_default!r} is not an api = "anthropic" upstream')
        self.anthropic_default = anthropic_default
        self.deployments = dict(deployments or {})
        self._names = ", ".join(sorted(self.upstreams))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = get_context(scope)
        problem = self._route(ctx)
        if problem is not None:
            await openai_error(400, problem[0], code=problem[1], param="model")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _route(self, ctx: RequestContext) -> tuple[str, str] | None:
        """Route `ctx`; (message, code) of a 400 with param "model" when it cannot be."""
        body = ctx.body
        if ctx.deployment is not None:
            # Azure's layout: the path names the model (the body's `model`, if any, is ignored there too).
            model: object = self.deployments.get(ctx.deployment, ctx.deployment)
            if body is not None:
                body["model"] = model
                ctx.body_changed = True
        else:
            model = body.get("model") if body is not None else None
        anthropic = ctx.api == "anthropic"
        default = self.anthropic_default if anthropic else self.default
        if model is None:
            if anthropic and default is None:
                return self._no_anthropic_upstream(None)
            ctx.provider = default or sorted(self.upstreams)[0]
            return None
        if not isinstance(model, str) or not model:
            return "model must be a non-empty string", "invalid_value"
        if len(model) > MAX_MODEL_CHARS:
            # The name becomes a metrics label and part of every usage event: keep it a name.
            return f"model must be at most {MAX_MODEL_CHARS} characters, got {len(model)}", "invalid_value"
        prefix, slash, rest = model.partition("/")
        if slash and (prefix not in self.upstreams or not rest):
            return (
                f"unknown provider {prefix!r} in model {model!r}; configured providers: {self._names}",
                "unknown_provider",
            )
        if slash:
            if anthropic and prefix not in self.anthropic:
                return (
                    f"provider {prefix!r} in model {model!r} has api = {self.apis[prefix]!r}, not Anthropic's "
                    f"Messages API; {self._anthropic_names()}",
                    "unknown_provider",
                )
            ctx.provider = prefix
            ctx.model = rest
            body["model"] = rest  # type: ignore[index]
            ctx.body_changed = True
        elif default is None:
            if anthropic:
                return self._no_anthropic_upstream(model)
            return (
                f"model {model!r} has no provider prefix and no default upstream is configured; "
                f"use one of: {self._names} (e.g. {sorted(self.upstreams)[0]}/{model})",
                "unknown_provider",
            )
        else:
            ctx.provider = default
            ctx.model = model
        ctx.model_ref = f"{ctx.provider}/{ctx.model}"
        return None

    def _anthropic_names(self) -> str:
        if not self.anthropic:
            return 'no upstream with api = "anthropic" is configured'
        return f'upstreams with api = "anthropic": {", ".join(sorted(self.anthropic))}'

    def _no_anthropic_upstream(self, model: str | None) -> tuple[str, str]:
        if not self.anthropic:
            return (
                'Anthropic Messages calls need an upstream with api = "anthropic"; none is configured',
                "unknown_provider",
            )
        example = f" (e.g. {sorted(self.anthropic)[0]}/{model})" if model else ""
        return (
            f'model {model!r} has no provider prefix and no api = "anthropic" upstream is default = true; '
            f"{self._anthropic_names()}{example}",
            "unknown_provider",
        )
