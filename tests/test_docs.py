"""The docs run and point at sections that exist.

1. Every ```python block of README.md and docs/*.md runs. A document's blocks run in order in one
   shared namespace (like a doctest session: the first block builds small inputs that the later
   ones use), with the working directory a fresh temporary directory (pytest's tmp_path), so
   blocks that write files (a work directory, a checkpoint) write them there. A failing block
   fails the test naming the file and the line of its opening fence.

   Marker convention: a block that is illustration only (it needs something the docs cannot
   provide, e.g. a cluster) is excluded explicitly by the line

       <!-- docs-test: illustration -->

   as the last non-blank line before its opening fence. Nothing else excludes a Python block; a
   marker that precedes no ```python fence is an error. Blocks in other fences (```bash, plain
   ``` for shell commands, ```text) are not Python and are not run.

2. References to docs/design.md name a section by its title, in one of two forms:

       docs/design.md, "Arnoldi influence and the spectral tail"     (code comments, docstrings)
       docs/design.md#arnoldi-influence-and-the-spectral-tail         (markdown links)

   Every such reference in the *.py and *.md files of influence_jax/, scripts/, configs/, tests/,
   docs/ and README.md must name a heading of docs/design.md (any level); an old-style numbered
   reference ("DESIGN §2", "design.md §4", "§5" inside design.md) fails the test, file:line named.
"""

from __future__ import annotations

import pathlib
import re
import traceback

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DESIGN = ROOT / "docs" / "design.md"
ILLUSTRATION = "<!-- docs-test: illustration -->"

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")


def code_blocks(text: str):
  """Yields (line of the opening fence, 1-based; info word; the block's source; illustration marker)."""
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    indent, fence, info = m.group(1), m.group(2), m.group(3).lower()
    prev = next((l.strip() for l in reversed(lines[:i]) if l.strip()), "")
    j = i + 1
    while j < len(lines) and not lines[j].strip().startswith(fence):
      j += 1
    body = "\n".join(l[len(indent):] if l.startswith(indent) else l for l in lines[i + 1:j])
    yield i + 1, info, body, prev == ILLUSTRATION
    i = j + 1


def python_blocks(path: pathlib.Path):
  """Returns [(line, source)] of the Python blocks of `path` that run; raises on a stray marker."""
  text = path.read_text(encoding="utf-8")
  blocks, marked = [], 0
  for line, info, body, illustration in code_blocks(text):
    if info not in ("python", "py"):
      if illustration:
        raise AssertionError(f"{path.relative_to(ROOT)}:{line}: {ILLUSTRATION} precedes a {info or 'plain'} block, not Python.")
      continue
    marked += illustration
    if not illustration:
      blocks.append((line, body))
  if text.count(ILLUSTRATION) != marked:
    raise AssertionError(f"{path.relative_to(ROOT)}: {ILLUSTRATION} must be the last line before a ```python fence.")
  return blocks


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  name = path.relative_to(ROOT).as_posix()
  namespace = {"__name__": f"docs_{path.stem}"}
  blocks = python_blocks(path)
  ran = 0
  for line, source in blocks:
    # Pad so that a traceback's line numbers are the document's.
    code = compile("\n" * line + source, name, "exec")
    try:
      exec(code, namespace)  # noqa: S102 (the repository's own documentation)
    except Exception:  # noqa: BLE001
      pytest.fail(f"{name}:{line}: the Python block starting here fails:\n{traceback.format_exc(limit=-3)}",
                  pytrace=False)
    ran += 1
  assert ran == len(blocks)
  if path == ROOT / "README.md":
    assert ran >= 5, "README.md's Python blocks are not found (the fence syntax changed?)"


# ----------------------------------------------------------------------------- section references

SCANNED = [ROOT / "README.md", *[p for d in ("influence_jax", "scripts", "configs", "tests", "docs")
                                  for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".md")]]
TITLE_REF = re.compile(r'design\.md, "([^"\n]+)"')
ANCHOR_REF = re.compile(r"design\.md#([\w-]+)")
# Numbered references: "§2", "§ 2.1", "DESIGN 4" ... This file spells them only in its docstring.
NUMBERED_REF = re.compile(r"§\s*\d|DESIGN\s+\d")


def design_headings() -> list[str]:
  return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", DESIGN.read_text(encoding="utf-8"), re.M)]


def slug(title: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def stale_references() -> list[str]:
  titles = set(design_headings())
  anchors = {slug(t) for t in titles}
  problems = []
  for path in SCANNED:
    if path == pathlib.Path(__file__).resolve():
      continue
    rel = path.relative_to(ROOT).as_posix()
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      for m in TITLE_REF.finditer(text):
        if m.group(1) not in titles:
          problems.append(f"{rel}:{n}: no heading {m.group(1)!r} in docs/design.md")
      for m in ANCHOR_REF.finditer(text):
        if m.group(1) not in anchors:
          problems.append(f"{rel}:{n}: no heading with anchor #{m.group(1)} in docs/design.md")
      if NUMBERED_REF.search(text):
        problems.append(f"{rel}:{n}: a numbered section reference; name the section by its title: {text.strip()}")
  return problems


def test_design_has_unique_headings():
  titles = design_headings()
  assert len(set(map(slug, titles))) == len(titles), titles


def test_design_references_resolve():
  problems = stale_references()
  assert not problems, "\n".join(problems)


def test_reference_check_sees_references():
  # The check is not vacuous: the package's docstrings do refer to design.md sections.
  text = (ROOT / "influence_jax" / "scoring.py").read_text(encoding="utf-8")
  assert TITLE_REF.search(text) or ANCHOR_REF.search(text)
