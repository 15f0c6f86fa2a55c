"""The built documentation site has no broken internal link and no missing figure.

Checks the HTML that ``python3 -m sphinx -W --keep-going -b html docs docs/_build/html`` wrote (the
README's docs command; ``.ci/run`` builds it after the tests and runs this file again). Every page under
``docs/_build/html`` is parsed: each internal ``href`` must name a file of the site and, with a
``#fragment``, an ``id`` in that file; each ``<img src>`` (and each ``<link>`` / ``<script>`` of the site)
must name a file of the site. Skips when the site has not been built, so the tests pass on a fresh clone
and the test suite never builds the documentation itself.
"""

from __future__ import annotations

import html.parser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

SITE = Path(__file__).resolve().parents[1] / "docs" / "_build" / "html"

pytestmark = pytest.mark.skipif(
    not (SITE / "index.html").is_file(),
    reason=f"the documentation is not built ({SITE} has no index.html): build it with "
    "python3 -m sphinx -W --keep-going -b html docs docs/_build/html",
)


class _Page(html.parser.HTMLParser):
    """The ids of a page and the references it makes: (tag, attribute, value)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("id", "name"):
            if attrs.get(key) and (key == "id" or tag == "a"):
                self.ids.add(attrs[key])
        for attr in ("href", "src"):
            if attrs.get(attr) is not None and tag in ("a", "img", "link", "script", "source", "iframe"):
                self.refs.append((tag, attr, attrs[attr]))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def pages() -> dict[Path, _Page]:
    return {path: _parse(path) for path in sorted(SITE.rglob("*.html"))}


def _internal_target(page: Path, value: str) -> tuple[Path, str] | None:
    """The file and fragment an internal reference points at; None for an external one."""
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or value.startswith(("mailto:", "javascript:", "data:")):
        return None
    path = unquote(parts.path)
    target = page if not path else (page.parent / path).resolve()
    if path.endswith("/") or target.is_dir():
        target = target / "index.html"
    return target, unquote(parts.fragment)


def test_the_site_has_its_pages(pages):
    names = {path.relative_to(SITE).as_posix() for path in pages}
    for expected in ("index.html", "changelog.html", "scvi-tools.html", "api/scvi.html",
                     "tutorials/cellassign.html", "tutorials/quickstart.html"):
        assert expected in names


def test_no_broken_internal_link(pages):
    broken = []
    for page, parsed in pages.items():
        for tag, attr, value in parsed.refs:
            found = _internal_target(page, value)
            if found is None:
                continue
            target, fragment = found
            where = f"{page.relative_to(SITE)}: <{tag} {attr}={value!r}>"
            if not target.is_file():
                broken.append(f"{where}: no file {target}")
            elif fragment and target.suffix == ".html" and fragment not in pages.get(target, _Page()).ids:
                broken.append(f"{where}: no id {fragment!r} in {target.relative_to(SITE)}")
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:50])


def test_every_figure_is_present(pages):
    images = [
        (page, value) for page, parsed in pages.items() for tag, _, value in parsed.refs if tag == "img"
    ]
    missing = [f"{page.relative_to(SITE)}: {value}" for page, value in images
               if (found := _internal_target(page, value)) is not None and not found[0].is_file()]
    assert not missing, "missing figures:\n" + "\n".join(missing)
    # the tutorials committed with outputs show their figures
    tutorial_images = [value for page, value in images if page.parent.name == "tutorials"]
    assert len(tutorial_images) >= 3


def test_math_is_left_to_mathjax(pages):
    # numpydoc math (:math: and .. math::) reaches the page as MathJax input, with the script loaded
    scvi = SITE / "api" / "scvi.html"
    text = scvi.read_text(encoding="utf-8")
    assert 'class="math' in text
    assert any(tag == "script" and "mathjax" in value.lower() for tag, _, value in pages[scvi].refs)
