"""proxy slice."""
