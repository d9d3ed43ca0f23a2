"""The documentation: generated pages match the code, links resolve, the README stays short."""

import re

import pytest

from embedfill import docs
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("name", list(docs.FILES))
def test_generated_files_match_the_options_table(name):
    assert (ROOT / name).read_text(encoding="utf-8") == docs.FILES[name](), (
        f"{name} differs from the options table: run `python -m embedfill.docs`"
    )


def test_every_setting_is_in_one_section_of_configuration_md():
    from embedfill.options import OPTIONS

    listed = [dest for _, _, dests in docs.SECTIONS for dest in dests]
    assert sorted(listed) == sorted(option.dest for option in OPTIONS)
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert all(f"`{option.env}`" in text for option in OPTIONS)
    assert {option.dest for option in OPTIONS if option.default is None} == set(docs.UNSET)  # says what unset means


def anchors(path):
    """GitHub's anchors for the headings of a markdown file."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target}"


def test_the_readme_is_short_and_links_to_the_bench_results_instead_of_copying_them():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "](bench/RESULTS.md)" in text
    assert "| raw write limit |" not in text and "| scenario |" not in text
    for page in ("operations", "sync", "quota", "batch-api", "columns-and-indexes", "model-guard", "providers",
                 "django", "configuration"):  # fmt: skip
        assert f"](docs/{page}.md)" in text, page
