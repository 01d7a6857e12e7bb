"""README.md and docs/*.md: every relative link reaches a file, and a #section a heading there."""
import re

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page):
    """GitHub's ids for the headings of a markdown page: lower case, punctuation dropped but for
    hyphens and underscores, spaces turned into hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_reach_a_file_and_a_heading(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked here (tests never go online)
            continue
        path, _, section = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif section and linked.suffix == ".md" and section not in anchors(linked):
            broken.append(f"{target}: no heading #{section} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_anchor_rule_is_githubs():
    """The ids of a few headings of these pages as GitHub renders them."""
    page = REPO / "docs" / "training.md"
    assert {"trainpys-recipe", "checkpoints-and---resume", "augmentation-mixup-and-cutmix"} <= anchors(page)


def test_the_code_map_names_every_module_script_and_benchmark():
    """docs/architecture.md's map stays true: each lib module, script and benchmark is in it,
    and everything it names exists."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    files = {*REPO.glob("lib/*.py"), *REPO.glob("*.py"), *REPO.glob("bench/*.py")} - {REPO / "lib" / "__init__.py"}
    missing = sorted(str(f.relative_to(REPO)) for f in files if str(f.relative_to(REPO)) not in text.split())
    named = set(re.findall(r"\b((?:lib|bench)/\w+\.py)\b", text))
    absent = sorted(name for name in named if not (REPO / name).exists())
    assert not missing and not absent, f"not in the map: {missing}; in the map but not in the code: {absent}"


def test_the_test_index_names_every_test_file_and_lib_module():
    """tests/conftest.py's index stays true: one line for each test file, none for a file that is
    gone, and every lib module named on the line of the file that tests it."""
    index = (REPO / "tests" / "conftest.py").read_text(encoding="utf-8").split("Index:", 1)[1].split('"""', 1)[0]
    named = re.findall(r"^  (test_\w+\.py) ", index, flags=re.MULTILINE)
    files = sorted(path.name for path in (REPO / "tests").glob("test_*.py"))
    assert sorted(named) == files and len(set(named)) == len(named), f"index: {named}; files: {files}"
    modules = sorted(str(p.relative_to(REPO)) for p in REPO.glob("lib/*.py") if p.name != "__init__.py")
    untested = [module for module in modules if module not in re.findall(r"lib/\w+\.py", index)]
    assert not untested, f"lib modules the index does not name: {untested}"
