"""reporting slice."""
