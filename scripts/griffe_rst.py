"""A griffe extension for the docs site: reads hkpipe's reST-flavoured docstrings as Markdown.

hkpipe's docstrings are Google style with two reST habits that Markdown renders badly:

- cross-reference roles, ``:class:`Pipeline``` or ``:func:`~hkpipe.models.build```, become inline
  code (``Pipeline``, ``build``) linked to the object's API entry where the name resolves (in the
  docstring's scope, as Python would, plus inherited members) to a documented object; names that
  resolve to nothing documented stay plain code (optional autorefs: no warning);
- literal blocks, a line ending in ``::`` followed by an indented block, become fenced code blocks
  (the ``::`` becomes ``:``).

Only the rendered site changes; the docstrings in the source stay as they are. Loaded by
mkdocs.yml (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")


def _lookup(scope: griffe.Object, name: str) -> str | None:
  """The path of ``name`` seen from ``scope`` (then its parents), or None."""
  while scope is not None:
    members = scope.all_members if scope.is_class else scope.members
    if name in members:
      member = members[name]
      return member.target_path if member.is_alias else member.path
    scope = scope.parent
  return None


def _resolve(obj: griffe.Object, target: str) -> str | None:
  """The path a role's target names in ``obj``'s docstring: absolute or looked up in its scope."""
  head, _, rest = target.partition(".")
  if head == obj.package.name:
    return target
  found = _lookup(obj, head)
  return found and (f"{found}.{rest}" if rest else found)


def _roles(obj: griffe.Object, text: str) -> str:
  def code(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    shown = f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"
    path = _resolve(obj, target)
    return f'<autoref identifier="{path}" optional>{shown}</autoref>' if path else shown
  return _ROLE.sub(code, text)


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _literal_blocks(lines: list[str]) -> list[str]:
  """Turns each ``::`` paragraph end plus its indented block into a fenced code block."""
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    i += 1
    if not line.rstrip().endswith("::"):
      out.append(line)
      continue
    base = _indent(line)
    head = line.rstrip()[:-2].rstrip()
    if head:
      out.append(head + ":")
    block_start = i
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
      i += 1
    block = lines[block_start:i]
    while block and not block[-1].strip():        # trailing blank lines stay outside the fence
      block.pop()
      i -= 1
    while block and not block[0].strip():         # so are the leading ones
      block.pop(0)
    if not block:
      continue
    cut = min(_indent(l) for l in block if l.strip())
    pad = " " * base
    out += ["", pad + "```"] + [pad + l[cut:] if l.strip() else "" for l in block] + [pad + "```"]
  return out


def to_markdown(obj: griffe.Object, text: str) -> str:
  """The Markdown form of ``obj``'s docstring ``text`` (roles -> code, literal blocks -> fences)."""
  return "\n".join(_literal_blocks(_roles(obj, text).split("\n")))


def _walk(obj: griffe.Object):
  yield obj
  for member in obj.members.values():
    if not member.is_alias:
      yield from _walk(member)


class RstToMarkdown(griffe.Extension):
  """Rewrites the docstrings of a loaded package with :func:`to_markdown`."""

  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
    for obj in _walk(pkg):
      if obj.docstring is not None:
        obj.docstring.value = to_markdown(obj, obj.docstring.value)
