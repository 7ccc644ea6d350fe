"""The layer rule, walked over every module's imports (a guard of the rule, not a snapshot of today's graph).

core (influence_jax/*.py) imports only core; methods import core and methods; examples import core,
methods and examples; eval imports core, methods, examples and eval; jobs import core, methods,
examples and jobs. Neither jobs nor eval imports the other. Imports inside functions count too.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "influence_jax"
LAYERS = ("methods", "examples", "eval", "jobs")
ALLOWED = {
    "core": {"core"},
    "methods": {"core", "methods"},
    "examples": {"core", "methods", "examples"},
    "eval": {"core", "methods", "examples", "eval"},
    "jobs": {"core", "methods", "examples", "jobs"},
}


def layer_of(module: str) -> str:
  """Returns the layer of a dotted module name under influence_jax ("core" for the package's own modules)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
  """Returns (line, module) for every influence_jax module `source` imports, relative imports resolved;
  `from influence_jax.x import name` counts as importing influence_jax.x.name when that is a module."""
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
      out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
      out.append((node.lineno, base))
  return [(line, m) for line, m in out if m == "influence_jax" or m.startswith("influence_jax.")]


def forbidden_imports(root: pathlib.Path = PACKAGE) -> list[str]:
  """Returns 'file:line: module (layer) imports target (layer)' for every import statement the rule forbids."""
  bad = {}
  for path in sorted(root.rglob("*.py")):
    module = module_name(path, root)
    for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
      if target.count(".") < 1:
        continue
      source_layer, target_layer = layer_of(module), layer_of(target)
      if target_layer not in ALLOWED[source_layer]:
        where = f"{path.relative_to(root.parent)}:{line}"
        bad.setdefault(where, f"{where}: {module} ({source_layer}) imports {target} ({target_layer})")
  return list(bad.values())


def test_no_module_imports_across_the_layer_rule():
  bad = forbidden_imports()
  assert not bad, "Imports against the layer rule (docs/design.md, layers):\n" + "\n".join(bad)


@pytest.mark.parametrize("module, line, layer", [
    ("influence_jax/scoring.py", "from influence_jax.jobs import common", "jobs"),
    ("influence_jax/methods/relative.py", "from influence_jax.examples import models", "examples"),
    ("influence_jax/eval/metrics.py", "  from influence_jax.jobs import task  # inside a function", "jobs"),
    ("influence_jax/examples/models.py", "from ..jobs import config", "jobs"),
])
def test_a_forbidden_import_is_found(tmp_path, module, line, layer):
  copy = tmp_path / "influence_jax"
  for path in PACKAGE.rglob("*.py"):
    target = copy / path.relative_to(PACKAGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(path.read_text())
  edited = tmp_path / module
  body = f"def _f():\n{line}\n" if line.startswith("  ") else line + "\n"
  edited.write_text(edited.read_text() + "\n" + body)
  bad = forbidden_imports(copy)
  assert len(bad) == 1 and f"({layer})" in bad[0] and module in bad[0], bad
