r"""The projection store's size on disk per example for each project.store_dtype (float32, bfloat16, float16),
at the jobs' default widths (k = 100, residual_rank = 128, sketch_dim = 1,024), rows of random values:

  python scripts/bench_store_size.py [--rows=8192] [--chunk_rows=1024]

Prints the bytes of every file of each store (zarr chunks with their crc32c, metadata, done markers)
divided by the rows, and the ratio to float32.
"""

import argparse
import os
import tempfile

import numpy as np

from influence_jax import store as store_lib


def store_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(directory) for n in names)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", type=int, default=8192)
  parser.add_argument("--chunk_rows", type=int, default=1024)
  parser.add_argument("--k", type=int, default=100)
  parser.add_argument("--residual_rank", type=int, default=128)
  parser.add_argument("--sketch_dim", type=int, default=1024)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  sizes = {}
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in store_lib.STORE_DTYPES:
      meta = store_lib.StoreMeta(num_rows=args.rows, k=args.k, sketch_dim=args.sketch_dim, chunk_rows=args.chunk_rows,
                                 fingerprint="bench", residual_rank=args.residual_rank, store_dtype=dtype)
      store = store_lib.create(os.path.join(tmp, dtype), meta)
      for chunk in range(meta.num_chunks):
        lo, hi = meta.chunk_bounds(chunk)
        store.write_chunk(chunk, {n: rng.normal(size=(hi - lo, *s[1:])).astype(np.float32)
                                  for n, s in meta.shapes().items()})
      sizes[dtype] = store_bytes(os.path.join(tmp, dtype)) / args.rows
  print(f"k={args.k} r={args.residual_rank} m={args.sketch_dim}, {args.rows} rows in chunks of {args.chunk_rows}")
  print("| store_dtype | bytes / example | of float32 |")
  print("|---|---|---|")
  for dtype, size in sizes.items():
    print(f"| {dtype} | {size:,.0f} | {size / sizes['float32']:.3f} |")


if __name__ == "__main__":
  main()
