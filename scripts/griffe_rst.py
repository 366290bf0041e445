"""A griffe extension for the docs site: reads hkpipe's reST-flavoured docstrings as Markdown.

hkpipe's docstrings are Google style with two reST habits that Markdown renders badly:

- cross-reference roles, ``:class:`Pipeline``` or ``:func:`~hkpipe.models.build```, become inline
  code (``Pipeline``, ``build``);
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


def _role_to_code(match: re.Match[str]) -> str:
  tilde, target = match.groups()
  return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


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


def to_markdown(text: str) -> str:
  """The Markdown form of one docstring (roles -> inline code, literal blocks -> fences)."""
  return "\n".join(_literal_blocks(_ROLE.sub(_role_to_code, text).split("\n")))


class RstToMarkdown(griffe.Extension):
  """Rewrites every docstring griffe loads with :func:`to_markdown`."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    if obj.docstring is not None:
      obj.docstring.value = to_markdown(obj.docstring.value)
