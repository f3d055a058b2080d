"""Reports of a run: per-item JSON files and the terminal summary table."""
