"""The proxied surface: request intake, routing to an upstream, and forwarding."""
