"""README.md, CONTRIBUTING.md, docs/ and benchmarks/README.md: every relative link leads to a file that
exists, and every anchor to a heading of it; the README stays short enough to read in one sitting."""

import re

import pytest
from conftest import REPO

PAGES = [
    REPO / "README.md",
    REPO / "CONTRIBUTING.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "benchmarks" / "README.md",
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def without_code(page):
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)


def anchors_of(page):
    """GitHub's anchors for a Markdown page's headings: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.+)$", without_code(page), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def relative_links(page):
    links = LINK.findall(without_code(page))
    return [link for link in links if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_and_a_heading_that_exist(page):
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{link} in {page.name}"
        if anchor and target.suffix == ".md":
            assert anchor in anchors_of(target), f"{link} in {page.name}"


def test_the_readme_is_read_in_one_sitting():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
