"""Built-in tasks (being written)."""
