"""The documentation cannot drift from the code.

- docs/backends.md is exactly what scripts/gen_backend_table.py makes of the registry;
- every relative link in docs/ and proofs/ leads to a file that exists, and a link
  whose text names a function or class (`name`) leads to the file that defines it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*(ROOT / "docs").rglob("*.md"), *(ROOT / "proofs").glob("*.md")])
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")

# Pages that docs/index.md announces and other people write; linking to them before
# they exist is fine, and once they exist they are checked like any other.
ANNOUNCED = {"testing-your-kernel.md", "golden-vectors.md", "triton.md", "cuda.md",
             "gpu-results.md", "benchmarks.md"}


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_backend_table", ROOT / "scripts" / "gen_backend_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backend_table_is_generated_from_the_registry():
    committed = (ROOT / "docs" / "backends.md").read_text(encoding="utf-8")
    assert committed == load_generator().render(), (
        "docs/backends.md is out of date: run python scripts/gen_backend_table.py")


def relative_links(page):
    """(text, target path) of every link of a page that is not a URL or an anchor."""
    for text, target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        yield text, (page.parent / target.split("#")[0]).resolve()


def missing_files(page):
    """Targets of the page's links that do not exist (announced pages excepted)."""
    return [str(path) for _, path in relative_links(page)
            if not path.exists() and path.name not in ANNOUNCED]


def undefined_names(page):
    """`name` links to a .py file that defines no function, class or constant `name`.

    A link whose name is the module itself (`dla_backends.testing` -> testing/__init__.py) is
    fine.
    """
    undefined = []
    for text, path in relative_links(page):
        named = re.fullmatch(r"`([\w.]+)`", text)
        if not named or path.suffix != ".py" or named.group(1).endswith(".py"):
            continue
        name = named.group(1).split(".")[-1]
        if name == path.stem or (path.stem == "__init__" and name == path.parent.name):
            continue
        source = path.read_text(encoding="utf-8")
        if not re.search(rf"^(def|class) {name}\b|^{name} = ", source, re.MULTILINE):
            undefined.append(f"{name} in {path}")
    return undefined


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_lead_somewhere(page):
    assert not missing_files(page)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_linked_names_are_defined_where_they_point(page):
    assert not undefined_names(page)


def test_the_checks_catch_a_wrong_link(tmp_path):
    step = ROOT / "dla_ref" / "step.py"
    page = tmp_path / "page.md"
    page.write_text(f"[`transition`]({step}) [`no_such_function`]({step}) "
                    f"[gone](no_such_page.md)", encoding="utf-8")
    assert undefined_names(page) == [f"no_such_function in {step}"]
    assert missing_files(page) == [str(tmp_path / "no_such_page.md")]
