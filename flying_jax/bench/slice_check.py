"""Does a device's run of rows cost a copy on this backend? `python -m flying_jax.bench.slice_check`

One device, the projections of one layer (Llama-3-8B shapes by default) in the resident layout:
for each width w, a program that takes device 0's run of rows with a dynamic slice (as a width-w
program does) and multiplies by it, against a program given the same rows as a separate array
(what a pre-sharded copy would cost). Reports, per width and weight, the compiled program's
temporary bytes (a materialised slice shows up there), whether any weight read is a copy
(`weight_reads`), and the median time of both. Run it on a GPU or TPU to see whether the backend
feeds the slice to the matrix unit in place; on XLA:CPU it is copied.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _time(fn, *args, reps: int = 30) -> float:
  import jax

  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return statistics.median(out)


def check(dim: int, rows: int, tokens: int, widths, dtype: str) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from flying_jax.runtime.weight_reads import weight_reads

  dt = jnp.dtype(dtype)
  w_rows = jnp.ones((rows, dim), dt)           # e.g. w_gate [F, D]: x @ W^T
  x = jnp.ones((tokens, dim), dt)
  results = []
  for width in widths:
    n = rows // width

    def sliced(w_q, x, d):                     # a width-w device's run, taken in the program
      return x @ jax.lax.dynamic_slice_in_dim(w_q, d * n, n, axis=0).T

    def given(w_q, x):                          # the run as its own array
      return x @ w_q.T

    d = jnp.int32(width - 1)
    compiled = jax.jit(sliced).lower(w_rows, x, d).compile()
    part = w_rows[:n]
    mem = compiled.memory_analysis()
    reads = weight_reads(compiled.as_text(), lambda name: name == "w_q")
    results.append({
        "width": width, "rows": n, "slice_bytes": part.nbytes,
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "reads": sorted({f"{r.op}:{r.kind}" for r in reads}),
        "sliced_ms": 1e3 * _time(compiled, w_rows, x, d),
        "given_ms": 1e3 * _time(jax.jit(given), part, x)})
  return results


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--dim", type=int, default=4096)
  p.add_argument("--rows", type=int, default=14336, help="rows of the weight (e.g. FFN columns)")
  p.add_argument("--tokens", type=int, default=16, help="activation rows (decode batch)")
  p.add_argument("--widths", default="1,2,4,8")
  p.add_argument("--dtype", default="bfloat16")
  args = p.parse_args()
  import jax

  out = check(args.dim, args.rows, args.tokens, [int(w) for w in args.widths.split(",")],
              args.dtype)
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
  print("| width | run | temp bytes / run bytes | reads | sliced | given |")
  print("|---|---|---|---|---|---|")
  for r in out:
    ratio = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / r['slice_bytes']:.2f}"
    print(f"| {r['width']} | {r['rows']} rows | {ratio} | {', '.join(r['reads'])} | "
          f"{r['sliced_ms']:.3f} ms | {r['given_ms']:.3f} ms |")
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
