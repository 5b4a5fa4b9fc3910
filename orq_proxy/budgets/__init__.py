"""budgets slice."""
