"""The docs site builds with warnings as errors, has every page in its nav and an API reference
whose pages hold the docstrings of every public name.

One strict ``mkdocs build`` (a subprocess, as ``scripts/docs.sh`` runs it) into a temporary folder;
the tests read the produced HTML back and compare it with what Python itself reports about the
public modules (``__all__``, ``__doc__``, ``inspect.signature``), not with griffe's view of them.
"""

from __future__ import annotations

import html
import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def public_modules() -> list[str]:
  """``hkpipe`` and its public submodules, from the package folder (not from mkdocs.yml)."""
  names = ["hkpipe"]
  for path in sorted((ROOT / "hkpipe").iterdir()):
    if path.name.startswith("_"):
      continue
    if path.suffix == ".py" or (path / "__init__.py").exists():
      names.append(f"hkpipe.{path.stem}")
  return names


def nav_pages(nav) -> list[str]:
  """Every page path in a mkdocs ``nav`` tree."""
  if isinstance(nav, str):
    return [nav]
  if isinstance(nav, list):
    return [p for item in nav for p in nav_pages(item)]
  return [p for value in nav.values() for p in nav_pages(value)]


def page_html(site: pathlib.Path, page: str) -> str:
  """The HTML mkdocs built for ``page`` (``api/models.md`` -> ``api/models/index.html``)."""
  stem = page[:-len(".md")]
  path = site / ("index.html" if stem == "index" else f"{stem}/index.html")
  return path.read_text()


def text_of(markup: str) -> str:
  """The visible text of some HTML, whitespace dropped (markup may split or join words)."""
  return "".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def summary_of(doc: str) -> str:
  """A docstring's first paragraph as plain text, whitespace dropped (reST roles and backticks
  too), comparable with :func:`text_of`."""
  first = inspect.cleandoc(doc).split("\n\n")[0]
  first = re.sub(r":[a-z]+:`~[^`]*?([^.`]+)`", r"\1", first)     # :class:`~a.B` reads B
  first = re.sub(r":[a-z]+:`([^`]+)`", r"\1", first).replace("`", "")
  return "".join(first.split())


def section(markup: str, anchor: str) -> str:
  """The HTML of one documented object: from its heading to the next object's heading."""
  start = markup.index(f'id="{anchor}"')
  nxt = re.compile(r'<h\d id="hkpipe[^"]*"').search(markup, start + 1)
  return markup[start:nxt.start() if nxt else len(markup)]


@pytest.fixture(scope="module")
def config() -> dict:
  return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("site")
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        check=False)
  if proc.returncode != 0:
    pytest.fail(f"mkdocs build --strict failed (rc {proc.returncode}):\n{proc.stdout}\n"
                f"{proc.stderr}")
  return out


def test_every_docs_page_is_in_the_nav_and_built(site, config):
  pages = nav_pages(config["nav"])
  on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
  assert sorted(pages) == on_disk, "pages in docs/ and in mkdocs.yml's nav differ"
  assert len(set(pages)) == len(pages), "a page is in the nav twice"
  for page in pages:
    assert "<h1" in page_html(site, page), page
  # An orphan page would only be an INFO line without this setting; with it, --strict fails.
  assert config["validation"]["nav"]["omitted_files"] == "warn"


def test_every_public_module_has_an_api_page_in_the_nav(config):
  api = {}
  for path in sorted((DOCS / "api").glob("*.md")):
    for directive in re.findall(r"^::: (\S+)", path.read_text(), flags=re.M):
      api[directive] = f"api/{path.name}"
  missing = sorted(set(public_modules()) - set(api))
  assert not missing, (f"public modules without an API page: {missing}; add docs/api/<name>.md "
                       "holding '::: <module>' and list it under 'API reference' in mkdocs.yml")
  assert set(api.values()) <= set(nav_pages(config["nav"]))


@pytest.mark.parametrize("module_name", public_modules())
def test_api_page_documents_every_public_name(site, module_name):
  module = importlib.import_module(module_name)
  page = "api/hkpipe.md" if module_name == "hkpipe" else f"api/{module_name.split('.')[1]}.md"
  markup = page_html(site, page)
  assert summary_of(module.__doc__) in text_of(section(markup, module_name))
  names = getattr(module, "__all__", None)
  assert names, f"{module_name} has no __all__ (its public names)"
  undocumented = []
  for name in names:
    anchor = f"{module_name}.{name}"
    if f'id="{anchor}"' not in markup:
      undocumented.append(name)      # the renderer hides public names without a docstring
      continue
    obj = getattr(module, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
      assert obj.__doc__, anchor
      assert summary_of(obj.__doc__) in text_of(section(markup, anchor)), anchor
  assert not undocumented, f"public names of {module_name} missing from its API page: {undocumented}"


def test_pipeline_page_documents_train_step(site):
  import hkpipe  # pylint: disable=import-outside-toplevel
  markup = page_html(site, "api/hkpipe.md")
  part = section(markup, "hkpipe.Pipeline.train_step")
  text = text_of(part)
  assert summary_of(hkpipe.Pipeline.train_step.__doc__) in text
  params = [p for p in inspect.signature(hkpipe.Pipeline.train_step).parameters if p != "self"]
  assert params == ["state", "batch"]
  assert re.search(r"train_step\(state.*batch\)", text), text[:300]
  # The class's own page section lists its methods and the properties of its private base.
  for anchor in ("hkpipe.Pipeline.init", "hkpipe.Pipeline.eval_step", "hkpipe.Pipeline.layout"):
    assert f'id="{anchor}"' in markup, anchor


def test_rest_markup_is_rendered_as_markdown(site):
  """No ``:class:`` role or ``::`` literal-block marker reaches the rendered API pages."""
  for path in sorted((site / "api").rglob("index.html")):
    text = text_of(path.read_text())
    assert not re.search(r":(class|func|meth|attr|mod|data|exc):", text), path
    assert "Typical use::" not in text and "Example::" not in text, path
  # The schedules module's "Typical use::" block is a code block, not a paragraph.
  markup = page_html(site, "api/schedules.md")
  code = re.search(r"Typical use:</p>\s*<pre><code>(.*?)</code></pre>", markup, flags=re.S)
  assert code and "schedules.get(" in html.unescape(code.group(1))


def test_cross_references_link_to_existing_anchors(site):
  """The docstrings' ``:class:``/``:func:`` references link to the documented objects, and every
  link of the API pages lands on a page and anchor that exist."""
  checked = 0
  for path in sorted((site / "api").rglob("index.html")):
    for href in re.findall(r'<a [^>]*href="([^"]+)"', path.read_text()):
      if re.match(r"[a-z]+:", href) or not href.strip("#"):
        continue                                           # external, or a bare "#"
      target, _, anchor = href.partition("#")
      page = (path.parent / target).resolve() if target else path
      if page.is_dir():
        page = page / "index.html"
      assert page.is_file(), (path, href)
      if anchor:
        assert f'id="{anchor}"' in page.read_text(), (path, href)
      checked += 1
  assert checked > 100, checked
  markup = page_html(site, "api/hkpipe.md")
  # Pipeline's docstring names :meth:`data_layout` (defined on a private base class).
  assert re.search(r'href="#hkpipe\.Pipeline\.data_layout"><code>data_layout</code>',
                   section(markup, "hkpipe.Pipeline"))
  # The package docstring names :mod:`hkpipe.models`, documented on its own page.
  assert 'href="../models/#hkpipe.models"><code>hkpipe.models</code>' in markup
