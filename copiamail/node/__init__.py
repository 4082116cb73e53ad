"""A running node: wiring, signals, worker processes."""
