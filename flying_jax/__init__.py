"""flying-jax: a JAX serving system that switches between data and tensor parallelism."""
