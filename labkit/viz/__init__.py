"""Layer 9: plots and widgets the notebooks show."""
