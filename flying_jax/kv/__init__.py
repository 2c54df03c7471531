"""The paged KV cache: device page pools and the host-side page allocator."""

from flying_jax.kv.pool import NULL_PAGE, DevicePools, PageLayout, PagePool, PoolExhausted

__all__ = ["NULL_PAGE", "DevicePools", "PageLayout", "PagePool", "PoolExhausted"]
