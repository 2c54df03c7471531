"""The engine: scheduler, executor wiring and per-token output handling."""
