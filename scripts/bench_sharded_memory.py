r"""Benchmark: per-device memory of the residual basis and the store's rows on a mesh, from XLA's own accounting.

For each mesh (data, model), compiles (does not run) the programs of one step of the residual basis fit (a
chunk's per-example gradients weighted into the (l, P) rows) and of one batch of store rows (projections on
W = [U; V] and the sketch, "vjp" path, R Wᵀ given), for an MLP whose kernels are split over 'model' where their width
allows, and prints XLA's per-device argument, temporary and output bytes beside (l or k + r)·P/|model|:
what a device holds of the flat-layout rows, the bound the stages keep to (plus the model's own).

  python scripts/bench_sharded_memory.py --num_cpu_devices=8 --meshes=1x1,1x8,2x4,8x1
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

_DEVICES = flags.DEFINE_integer("num_cpu_devices", 8, "Virtual CPU devices (set before JAX starts; CPU only).")
_MESHES = flags.DEFINE_list("meshes", ["1x1", "1x8", "2x4", "8x1"], "Mesh shapes data x model.")
_SIZES = flags.DEFINE_list("sizes", ["256", "2048", "512", "10"], "MLP layer widths (default p = 1,580,554).")
_ROWS = flags.DEFINE_integer("rows", 144, "Rows l of the basis being fitted (rank 128 + oversample 16).")
_K = flags.DEFINE_integer("k", 228, "Rows k + r of W = [U; V] the store's rows are projected on.")
_BATCH = flags.DEFINE_integer("batch", 8, "Examples per chunk of the basis's sample and per store micro-batch.")
_SKETCH = flags.DEFINE_integer("sketch_dim", 1024, "Sketch dimension m.")


def per_example_loss(params, batch):
  h = batch["x"]
  for layer in params[:-1]:
    h = jnp.tanh(h @ layer["w"] + layer["b"])
  return optax.softmax_cross_entropy_with_integer_labels(h @ params[-1]["w"] + params[-1]["b"], batch["y"])


def shaped(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def main(_):
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)  # before any computation starts the backend
  from influence_jax import residual_basis, sharding, sketch

  sizes = [int(s) for s in _SIZES.value]
  print(f"{'mesh':>5} {'p':>9} {'rows·P/model MiB':>17} {'basis step: args / temp / out MiB':>34} "
        f"{'store rows: args / temp / out MiB':>34}")
  for name in _MESHES.value:
    data, model = (int(s) for s in name.split("x"))
    mesh = sharding.make_mesh((data, model), devices=jax.devices()[:data * model])
    params = []
    for m, n in zip(sizes[:-1], sizes[1:]):
      kernel = sharding.replicated(mesh) if n % model else NamedSharding(mesh, P(None, sharding.MODEL))
      params.append({"w": shaped((m, n), jnp.float32, kernel), "b": shaped((n,), jnp.float32, sharding.replicated(mesh))})
    p = sharding.num_params(params)
    cols, c = sharding.padded_dim(p, mesh), _BATCH.value
    batch = {"x": shaped((c, sizes[0]), jnp.float32, sharding.replicated(mesh)),
             "y": shaped((c,), jnp.int32, sharding.replicated(mesh))}
    flat = lambda rows: shaped((rows, cols), jnp.float32, sharding.flat_sharding(mesh, 2))
    basis = residual_basis._add_weighted_gradients.lower(
        per_example_loss, mesh, params, batch, shaped((c, _ROWS.value), jnp.float32, sharding.replicated(mesh)),
        flat(_ROWS.value)).compile().memory_analysis()
    sk = sketch.make_sketch(p, _SKETCH.value, 0)
    factors = tuple(shaped(x.shape, x.dtype, sharding.replicated(mesh)) for x in (sk.left, sk.right)) + (
        shaped((_K.value, sk.dim), jnp.float32, sharding.replicated(mesh)),)  # R Wᵀ, made once per job
    store = sketch._project_and_sketch.lower(per_example_loss, c, mesh, p, params, flat(_K.value), factors,
                                             batch).compile().memory_analysis()
    mib = lambda b: b / 2**20
    line = lambda a: (f"{mib(a.argument_size_in_bytes):8.1f} / {mib(a.temp_size_in_bytes):7.1f} / "
                      f"{mib(a.output_size_in_bytes):7.1f}")
    print(f"{name:>5} {p:9d} {mib(_ROWS.value * cols * 4 / model):8.1f} / {mib(_K.value * cols * 4 / model):6.1f} "
          f"{line(basis):>34} {line(store):>34}")


if __name__ == "__main__":
  app.run(main)
