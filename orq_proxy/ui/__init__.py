"""The dashboard at `/ui`: identities, budgets and reports for a finance or ops person, in the browser.

The page is static HTML, CSS and JavaScript shipped inside the package (`orq_proxy/ui/static/`, no build
step, no CDN); it talks to the public `/v2/*` management API with an admin key the user types in, which it
keeps for the tab only (`sessionStorage`). The proxy itself only serves files: loading `/ui` needs no key,
and the page can do nothing the key could not do through the API.

Failure policy: fails closed. Only the files found under `static/` when `routes()` runs are served, each
by its exact relative path (so no path, encoded or not, can reach anything else), with a content type
from a fixed table; every response carries a Content-Security-Policy that allows scripts, styles and
connections to this origin only and no inline script.
"""

from __future__ import annotations

from orq_proxy.ui.assets import CONTENT_SECURITY_POLICY, routes

__all__ = ["CONTENT_SECURITY_POLICY", "routes"]
