"""The contractions a per-example loss applies to its parameter leaves, found in its jaxpr.

`discover` traces one example's loss and lists every `dot_general(x, W)` whose W is a parameter leaf
(or a dtype conversion of one) and whose x holds one vector per example (`Site`), through calls and
scans; `interpret` evaluates a jaxpr calling a hook at each site (to record x and perturb the output).
`traced` builds the layer-wise projections on them (its docstring says which contractions qualify).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


# Call primitives whose body is evaluated in place (their contractions are found); "params" key of the body.
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "checkpoint": "jaxpr", "remat": "jaxpr"}


class Site(NamedTuple):
  """One contraction dot_general(x, W) of a parameter leaf W, in one example's forward pass.

  leaf: W's index in `jax.tree.leaves(params)`; w_contract / w_free: W's contracted and free
  dimensions, x_order: x's dimensions with its contracted ones first, paired with w_contract;
  x_shape / out_shape / out_dtype: for a batch of one.
  """

  leaf: int
  w_contract: tuple[int, ...]
  w_free: tuple[int, ...]
  x_order: tuple[int, ...]
  x_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  out_dtype: Any
  scan: int = 0  # Inside a `scan` of this many iterations (0: not), its `group`-th (in evaluation order).
  group: int = -1
  sliced: bool = False  # W is the iteration's slice of a stacked leaf (the scan's xs), not the whole leaf.

  @property
  def pert_shape(self) -> tuple[int, ...]:
    return ((self.scan,) if self.scan else ()) + self.out_shape

  @property
  def uses(self) -> int:
    """How many products of the leaf's (slice's) gradient this site sums: a scan's iterations unless sliced."""
    return self.scan if self.scan and not self.sliced else 1

  @property
  def in_size(self) -> int:
    return math.prod(self.x_shape)

  @property
  def out_size(self) -> int:
    return math.prod(self.out_shape)

  @property
  def layout_key(self) -> str:
    return f"{self.leaf}:{','.join(map(str, self.w_contract))}{':sliced' if self.sliced else ''}"


class Discovery(NamedTuple):
  """sites: the contractions, in evaluation order; other: the leaves read elsewhere; scans: how many
  scans read a leaf (run by the interpreter)."""

  closed: Any
  sites: tuple[Site, ...]
  other: frozenset
  scans: int = 0

  def groups(self) -> list[list[int]]:
    """Returns, per scan read by the interpreter, the indices of its sites."""
    return [[i for i, s in enumerate(self.sites) if s.group == g] for g in range(self.scans)]


def _site_of(eqn, tags, avals) -> Optional[Site]:
  """Returns the Site of a dot_general eqn whose one operand is a tagged leaf, else None."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb:
    return None
  lt, rt = tags
  if (lt is None) == (rt is None):
    return None
  w_side = 0 if lt is not None else 1
  w_aval, x_aval = avals[w_side], avals[1 - w_side]
  w_contract = tuple(lc if w_side == 0 else rc)
  x_contract = tuple(rc if w_side == 0 else lc)
  x_free = tuple(d for d in range(x_aval.ndim) if d not in x_contract)
  if math.prod(x_aval.shape[d] for d in x_free) != 1:  # Applied at several positions.
    return None
  w_free = tuple(d for d in range(w_aval.ndim) if d not in w_contract)
  out = eqn.outvars[0].aval
  leaf, sliced = tags[w_side]
  return Site(leaf, w_contract, w_free, x_contract + x_free, tuple(x_aval.shape), tuple(out.shape), out.dtype,
              sliced=sliced)


def interpret(jaxpr, consts, args, tags, hook, in_scan=False):
  """Evaluates `jaxpr` like `jax.core.eval_jaxpr`, inlining calls; `tags`: per invar, (the parameter
  leaf, whether it is a scan iteration's slice of it) or None. `hook.contraction(site, x, y) -> y`:
  at each found contraction; `hook.other(leaf)`: at any other read of a leaf; a `scan` that reads a
  leaf runs its body through this interpreter too (`_scan`), unless inside another (`in_scan`:
  then its leaves are read elsewhere)."""
  env, tag_of = {}, {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def tag(v):
    return None if isinstance(v, jex_core.Literal) else tag_of.get(v)

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, t in zip(jaxpr.invars, args, tags):
    env[v] = a
    if t is not None:
      tag_of[v] = t
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    invals = [read(v) for v in eqn.invars]
    in_tags = [tag(v) for v in eqn.invars]
    if name in _INLINE:
      body = eqn.params[_INLINE[name]]
      inner, inner_consts = (body.jaxpr, body.consts) if hasattr(body, "consts") else (body, ())
      outs = interpret(inner, inner_consts, invals, in_tags, hook, in_scan)
    elif name == "scan" and not in_scan and any(t is not None for t in in_tags):
      outs = _scan(eqn, invals, in_tags, hook)
    elif name == "convert_element_type" and in_tags[0] is not None:
      outs = [eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))]
      tag_of[eqn.outvars[0]] = in_tags[0]
    else:
      site = _site_of(eqn, in_tags, [v.aval for v in eqn.invars]) if name == "dot_general" else None
      for t in in_tags:
        if t is not None and site is None:
          hook.other(t[0])
      ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if site is not None:
        ans = hook.contraction(site, invals[1 if in_tags[0] is not None else 0], ans)
      outs = ans if eqn.primitive.multiple_results else [ans]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  for v in jaxpr.outvars:
    if tag(v) is not None:
      hook.other(tag(v)[0])
  return [read(v) for v in jaxpr.outvars]


def _scan(eqn, invals, in_tags, hook):
  """Evaluates a `scan` eqn as `jax.lax.scan` of a body run by `interpret`: the leaves it reads as
  constants keep their tags, those it slices (its xs) are tagged as slices, a leaf in its carry is
  read elsewhere. The hook's perturbations of the body's contractions go in as extra xs (one per
  iteration) and their inputs come out as extra ys (`hook.scan_begin` / `scan_end`)."""
  p = eqn.params
  nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
  body = p["jaxpr"]
  for t in in_tags[nc:nc + ncar]:
    if t is not None:
      hook.other(t[0])
  inner_tags = (list(in_tags[:nc]) + [None] * ncar
                + [None if t is None else (t[0], True) for t in in_tags[nc + ncar:]])
  consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  perts = hook.scan_begin(length)

  def step(carry, sliced):
    xs_i, perts_i = sliced
    inner = hook.scan_body(length, perts_i)
    outs = interpret(body.jaxpr, body.consts, list(consts) + list(carry) + list(xs_i), inner_tags, inner,
                      in_scan=True)
    return outs[:ncar], (outs[ncar:], inner.inputs)

  carry, (ys, inputs) = jax.lax.scan(step, list(init), (list(xs), perts), length=length, reverse=p["reverse"],
                                     unroll=p["unroll"])
  hook.scan_end(inputs)
  return list(carry) + list(ys)


class _Finder:
  """Records the sites (in evaluation order) and the leaves read elsewhere."""

  def __init__(self, outer=None, length=0):
    self.sites, self.elsewhere = ([], set()) if outer is None else (outer.sites, outer.elsewhere)
    self.length, self.groups, self.inputs = length, 0, []  # inputs: none recorded (`_scan` returns them).

  def contraction(self, site, x, y):
    if self.length:
      site = site._replace(scan=self.length, group=self.groups - 1)
    self.sites.append(site)
    return y

  def other(self, leaf):
    self.elsewhere.add(leaf)

  def scan_begin(self, length):
    self.groups += 1
    return []

  def scan_body(self, length, perts):
    inner = _Finder(self, length)
    inner.groups = self.groups
    return inner

  def scan_end(self, inputs):
    pass


def _one_example_jaxpr(per_example_loss_fn, params, example):
  leaves, treedef = jax.tree.flatten(params)
  shapes = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), t)
  f = lambda ls, ex: per_example_loss_fn(jax.tree.unflatten(treedef, ls), ex)[0]
  return jax.make_jaxpr(f)(shapes(leaves), shapes(example))


def discover(per_example_loss_fn, params, example) -> Discovery:
  """Traces one example's loss (`example`: a batch of one, arrays or shapes) and returns its
  contractions of parameter leaves and the leaves read elsewhere."""
  closed = _one_example_jaxpr(per_example_loss_fn, params, example)
  n = len(jax.tree.leaves(params))
  finder = _Finder()
  avals = [v.aval for v in closed.jaxpr.invars]
  tags = [(i, False) for i in range(n)] + [None] * (len(avals) - n)
  jax.eval_shape(lambda *args: interpret(closed.jaxpr, closed.consts, args, tags, finder),
                 *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])
  return Discovery(closed, tuple(finder.sites), frozenset(finder.elsewhere), finder.groups)


def factored_leaves(found: Discovery, with_norms: bool) -> frozenset:
  """Returns the leaves projected from their contractions' inputs and output gradients: read only by
  found contractions, and by one only when squared norms are asked for."""
  uses = {}
  for s in found.sites:
    uses[s.leaf] = uses.get(s.leaf, 0) + s.uses
  return frozenset(leaf for leaf, n in uses.items() if leaf not in found.other and (n == 1 or not with_norms))
