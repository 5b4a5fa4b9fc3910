"""identities slice."""
