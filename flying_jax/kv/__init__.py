"""The paged KV cache: device page pools and the host-side page allocator."""

from flying_jax.kv.pool import DevicePools, PageLayout, PagePool, PoolExhausted

__all__ = ["DevicePools", "PageLayout", "PagePool", "PoolExhausted"]
