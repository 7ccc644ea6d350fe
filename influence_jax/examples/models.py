"""Small example models (Flax Linen and NNX) and per-example losses.

- `MLP`: Linen multilayer perceptron (flattens its input). The default
  (features=(32,), num_classes=10) on 64-pixel digits has 2,410 parameters;
  features=(256, 256) gives about 85,000.
- `CNN`: Linen conv net for 8x8x1 digits, optional BatchNorm (eval mode with
  `train=False`).
- `TinyNet`: Linen CNN like the GIF authors' TinyNet: the 8x8 digits upsampled
  ×4 to 32x32, four 3x3 stride-2 convolutions (16, 32, 64, 128 filters) and a
  linear head: 102,282 parameters.
- `Transformer`: Linen encoder-decoder for `datasets.synthetic_seq2seq`;
  `model.apply(v, src, tgt)` returns teacher-forced logits (B, L, V).
- `NNXMLP`: Flax NNX MLP with the same layer names, initialisers and forward
  pass as `MLP`; `nnx_mlp_from_linen` copies a Linen MLP's params into one.

Losses return one value per example, so `loss_fn` = their mean (+ L2) and
`per_example_loss_fn` share the same definition.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Activation = str | Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- losses


def _cross_entropy(logits: jax.Array, labels: jax.Array, checked: jax.Array | bool = True) -> jax.Array:
  """Returns −log softmax(logits)[label] per position, NaN (value and gradient) where `checked` and the
  label is outside [0, num_classes): a bad label surfaces in the jobs' finiteness checks, never as a
  finite wrong loss."""
  valid = (labels >= 0) & (labels < logits.shape[-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  return ce * jnp.where(valid | ~jnp.asarray(checked, bool), 1.0, jnp.nan).astype(ce.dtype)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Returns (B,) per-example cross-entropy −log softmax(logits)[label] (integer labels; NaN for a label
  outside [0, num_classes))."""
  if logits.ndim != labels.ndim + 1:
    raise ValueError(f"logits must have one more axis than labels; got {logits.shape} and {labels.shape}.")
  return _cross_entropy(logits, labels)


def sequence_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Returns (B,) per-example mean token cross-entropy of (B, L, V) logits against (B, L) labels.

  With `mask` (B, L) (1 = real token) the mean is over the unmasked tokens.
  """
  if logits.ndim != 3 or labels.ndim != 2:
    raise ValueError(f"expected logits (B, L, V) and labels (B, L); got {logits.shape} and {labels.shape}.")
  if mask is None:
    return jnp.mean(_cross_entropy(logits, labels), axis=-1)
  tok = _cross_entropy(logits, labels, checked=mask > 0)  # Masked positions may hold any label.
  mask = mask.astype(tok.dtype)
  return jnp.sum(jnp.where(mask > 0, tok, 0.0), axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _activation(act: Activation) -> Callable[[jax.Array], jax.Array]:
  if callable(act):
    return act
  fn = getattr(jax.nn, act, None)
  if fn is None:
    raise ValueError(f"unknown activation {act!r}: name a function in jax.nn (e.g. 'relu', 'tanh', 'gelu').")
  return fn


def num_params(params: Any) -> int:
  """Returns the number of scalars in a params pytree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- Linen


class MLP(nn.Module):
  """Dense layers `hidden_0..` with `activation`, then a linear `output` layer: logits (B, num_classes).

  Inputs are flattened to (B, -1). Kernels use lecun_normal, biases zeros
  (the Linen and NNX defaults).
  """

  features: Sequence[int] = (32,)
  num_classes: int = 10
  activation: Activation = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _activation(self.activation)
    x = x.reshape((x.shape[0], -1))
    for i, f in enumerate(self.features):
      x = act(nn.Dense(f, name=f"hidden_{i}")(x))
    return nn.Dense(self.num_classes, name="output")(x)


class CNN(nn.Module):
  """Two 3x3 convolutions (the second strided) and a linear head, for (B, 8, 8, 1) images.

  With `use_batch_norm`, each convolution is followed by BatchNorm, which uses
  its running averages when `train=False` (the mode influence is computed in).
  """

  features: Sequence[int] = (8, 16)
  num_classes: int = 10
  use_batch_norm: bool = False
  activation: Activation = "relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act = _activation(self.activation)
    if x.ndim == 2:
      side = int(round(np.sqrt(x.shape[1])))
      x = x.reshape((x.shape[0], side, side, 1))
    for i, f in enumerate(self.features):
      x = nn.Conv(f, (3, 3), strides=(1, 1) if i == 0 else (2, 2), name=f"conv_{i}")(x)
      if self.use_batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn_{i}")(x)
      x = act(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, name="output")(x)


class TinyNet(nn.Module):
  """Four 3x3 stride-2 convolutions (ReLU) and a linear head, on images upsampled by `upsample`.

  Input (B, H, W, 1) or flat square (B, H·H); nearest-neighbour upsampling by
  `upsample` (8x8 digits → 32x32 → 16, 8, 4, 2 after the convolutions, so every
  kernel tap sees image pixels). The defaults have 102,282 parameters.
  """

  features: Sequence[int] = (16, 32, 64, 128)
  num_classes: int = 10
  upsample: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 2:
      side = int(round(np.sqrt(x.shape[1])))
      x = x.reshape((x.shape[0], side, side, 1))
    x = jnp.repeat(jnp.repeat(x, self.upsample, axis=1), self.upsample, axis=2)
    for i, f in enumerate(self.features):
      x = nn.relu(nn.Conv(f, (3, 3), strides=(2, 2), name=f"conv_{i}")(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, name="output")(x)


class _EncoderBlock(nn.Module):
  d_model: int
  num_heads: int
  d_ff: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln_attn")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="self_attn")(h, h)
    h = nn.LayerNorm(name="ln_ff")(x)
    return x + nn.Dense(self.d_model, name="ff_out")(nn.gelu(nn.Dense(self.d_ff, name="ff_in")(h)))


class _DecoderBlock(nn.Module):
  d_model: int
  num_heads: int
  d_ff: int

  @nn.compact
  def __call__(self, y, enc):
    causal = nn.make_causal_mask(jnp.ones(y.shape[:2], jnp.int32))
    h = nn.LayerNorm(name="ln_self")(y)
    y = y + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="self_attn")(h, h, mask=causal)
    h = nn.LayerNorm(name="ln_cross")(y)
    y = y + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="cross_attn")(h, enc)
    h = nn.LayerNorm(name="ln_ff")(y)
    return y + nn.Dense(self.d_model, name="ff_out")(nn.gelu(nn.Dense(self.d_ff, name="ff_in")(h)))


class Transformer(nn.Module):
  """Pre-LayerNorm encoder-decoder for seq2seq with learned positions and no dropout.

  `__call__(src, tgt)` feeds the decoder [bos, tgt[:, :-1]] (teacher forcing)
  and returns logits (B, L_tgt, vocab_size) predicting tgt. Token `bos`
  (default 0) is the start token of `datasets.synthetic_seq2seq`.
  """

  vocab_size: int
  max_len: int = 32
  d_model: int = 32
  num_heads: int = 2
  d_ff: int = 64
  num_layers: int = 1
  bos: int = 0

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.d_model)
    self.src_pos = self.param("src_pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
    self.tgt_pos = self.param("tgt_pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
    self.encoder = [_EncoderBlock(self.d_model, self.num_heads, self.d_ff) for _ in range(self.num_layers)]
    self.decoder = [_DecoderBlock(self.d_model, self.num_heads, self.d_ff) for _ in range(self.num_layers)]
    self.ln_enc = nn.LayerNorm()
    self.ln_dec = nn.LayerNorm()
    self.head = nn.Dense(self.vocab_size)

  def _check_len(self, tokens, what):
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"{what} length {tokens.shape[1]} exceeds max_len={self.max_len}.")

  def encode(self, src: jax.Array) -> jax.Array:
    self._check_len(src, "src")
    x = self.embed(src) + self.src_pos[: src.shape[1]]
    for block in self.encoder:
      x = block(x)
    return self.ln_enc(x)

  def decode(self, enc: jax.Array, dec_in: jax.Array) -> jax.Array:
    self._check_len(dec_in, "tgt")
    y = self.embed(dec_in) + self.tgt_pos[: dec_in.shape[1]]
    for block in self.decoder:
      y = block(y, enc)
    return self.head(self.ln_dec(y))

  def __call__(self, src: jax.Array, tgt: jax.Array) -> jax.Array:
    bos = jnp.full((tgt.shape[0], 1), self.bos, tgt.dtype)
    dec_in = jnp.concatenate([bos, tgt[:, :-1]], axis=1)
    return self.decode(self.encode(src), dec_in)


class _CausalBlock(nn.Module):
  d_model: int
  num_heads: int
  d_ff: int

  @nn.compact
  def __call__(self, x):
    causal = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm(name="ln_attn")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="self_attn")(h, h, mask=causal)
    h = nn.LayerNorm(name="ln_ff")(x)
    return x + nn.Dense(self.d_model, name="ff_out")(nn.gelu(nn.Dense(self.d_ff, name="ff_in")(h)))


class DecoderLM(nn.Module):
  """Pre-LayerNorm decoder-only Transformer language model (causal self-attention, learned positions, no
  dropout): `__call__(tokens)` (B, L) returns logits (B, L, vocab_size), position t predicting token t + 1."""

  vocab_size: int
  max_len: int = 64
  d_model: int = 64
  num_heads: int = 4
  d_ff: int = 256
  num_layers: int = 2

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.max_len}.")
    pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
    x = nn.Embed(self.vocab_size, self.d_model, name="embed")(tokens) + pos[: tokens.shape[1]]
    for i in range(self.num_layers):
      x = _CausalBlock(self.d_model, self.num_heads, self.d_ff, name=f"block_{i}")(x)
    return nn.Dense(self.vocab_size, name="head")(nn.LayerNorm(name="ln_out")(x))


def greedy_decode(model: Transformer, params: Any, src: jax.Array, length: int | None = None) -> jax.Array:
  """Returns (B, length) tokens decoded greedily from `src` (length defaults to src's)."""
  length = src.shape[1] if length is None else length
  variables = {"params": params}
  enc = model.apply(variables, src, method=Transformer.encode)
  out = jnp.full((src.shape[0], length + 1), model.bos, src.dtype)

  def step(i, out):
    logits = model.apply(variables, enc, out[:, :-1], method=Transformer.decode)
    nxt = jnp.argmax(logits[:, i], axis=-1).astype(out.dtype)
    return out.at[:, i + 1].set(nxt)

  # The decoder is causal, so positions > i do not affect the prediction at i.
  return jax.lax.fori_loop(0, length, step, out)[:, 1:]


# ----------------------------------------------------------------------------- NNX


class NNXMLP(nnx.Module):
  """NNX twin of `MLP`: layers `hidden_0..` and `output` (nnx.Linear: lecun_normal kernels, zero biases).

  Its nnx.Param state, as a pure dict, has the same structure as a Linen
  MLP's params, so `nnx_mlp_from_linen` copies one into the other.
  """

  def __init__(self, in_features: int, features: Sequence[int] = (32,), num_classes: int = 10,
               activation: Activation = "relu", *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.num_hidden = len(features)
    self.activation = activation
    sizes = [in_features, *features]
    for i in range(len(features)):
      setattr(self, f"hidden_{i}", nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs, param_dtype=param_dtype))
    self.output = nnx.Linear(sizes[-1], num_classes, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = _activation(self.activation)
    x = x.reshape((x.shape[0], -1))
    for i in range(self.num_hidden):
      x = act(getattr(self, f"hidden_{i}")(x))
    return self.output(x)


def nnx_mlp_from_linen(module: MLP, params: Any, *, rngs: nnx.Rngs | None = None) -> NNXMLP:
  """Returns an NNXMLP with `module`'s architecture holding a copy of the Linen `params`.

  `params` is the Linen params collection (variables["params"]), not the full
  variables dict. Raises ValueError when its layers do not match `module`.
  """
  if not isinstance(module, MLP):
    raise TypeError(f"nnx_mlp_from_linen needs an influence_jax.models.MLP; got {type(module).__name__}.")
  params = jax.tree.map(jnp.asarray, dict(params))
  if "params" in params:
    raise ValueError("pass variables['params'], not the whole variables dict.")
  expected = {f"hidden_{i}" for i in range(len(module.features))} | {"output"}
  if set(params) != expected:
    raise ValueError(f"Linen MLP params have layers {sorted(params)}; the module expects {sorted(expected)}.")
  in_features = params["hidden_0" if module.features else "output"]["kernel"].shape[0]
  dtype = params["output"]["kernel"].dtype
  model = NNXMLP(in_features, tuple(module.features), module.num_classes, module.activation,
                 rngs=rngs or nnx.Rngs(0), param_dtype=dtype)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def nnx_mlp_to_linen_params(model: NNXMLP) -> dict:
  """Returns the NNXMLP's parameters as a Linen MLP params dict ({"hidden_0": {"kernel", "bias"}, ...})."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))
