"""Layer 10, the top: the `labkit` command."""
