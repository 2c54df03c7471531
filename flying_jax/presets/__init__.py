"""Model cards, mesh presets and hardware presets: where each name comes from."""

from flying_jax.presets.catalog import Source, entries, find, in_checkout, roots, writable_folder

__all__ = ["Source", "entries", "find", "in_checkout", "roots", "writable_folder"]
