"""One engine over the devices of several processes (hosts), on JAX's multi-controller runtime.

`join` connects this process to the others with `jax.distributed.initialize` (the coordinator
on process 0); the mesh then spans every process's devices. Process 0, the leader, owns the
scheduler, the policy and the front doors; the others, followers, run no scheduler: `lockstep`
hands them every program dispatch the leader makes, in its order, with its packed step rows,
and they make the same one (every process must dispatch the same programs in the same order).
"""
