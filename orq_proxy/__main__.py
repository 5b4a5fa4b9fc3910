"""`python -m orq_proxy` is `orq-proxy`."""

from __future__ import annotations

from orq_proxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
