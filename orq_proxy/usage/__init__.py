"""The usage kernel, below every slice: what a request used and cost (`UsageEvent`, `TokenUsage`, `Cost`),
how it is priced (`Pricer`), how an unknown usage is estimated, and money (`money`). Budgets, identities,
metering, reporting and the sinks all build on it; it imports none of them."""
