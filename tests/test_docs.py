"""The docs cannot drift from the code: the module map names exactly the package's modules, and
relative links reach their files and headings."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "textinv"
MAP = ROOT / "docs" / "contributing.md"
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_MODULES = {"__init__.py", "__main__.py"}  # the package's entry points, not modules with a job

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CELL_SPLIT = re.compile(r"(?<!\\)\|")  # `{a\|b}` inside a cell is one cell


def package_modules() -> set[str]:
    """Every module file in textinv/, as a path relative to it (``formats.py``, ``world/spec.py``)."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name not in NOT_MODULES and "__pycache__" not in p.parts}


def table_after(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith(header))
    rows = []
    for line in lines[start + 2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in CELL_SPLIT.split(line.strip().strip("|"))])
    return rows


def module_map() -> dict[str, str]:
    rows = table_after(MAP.read_text(encoding="utf-8"), "|module|onejob|")
    names = [re.fullmatch(r"`([\w/]+\.py)`", row[0]) for row in rows]
    assert all(names), f"every first cell of the module map is one `path.py`: {[r[0] for r in rows]}"
    return {m.group(1): row[1] for m, row in zip(names, rows)}


def test_the_module_map_names_exactly_the_modules_in_the_package():
    mapped, on_disk = set(module_map()), package_modules()
    assert not mapped - on_disk, f"docs/contributing.md maps modules that are not in textinv/: {sorted(mapped - on_disk)}"
    assert not on_disk - mapped, f"modules in textinv/ missing from docs/contributing.md's map: {sorted(on_disk - mapped)}"


def test_every_module_in_the_map_says_its_job_once():
    rows = table_after(MAP.read_text(encoding="utf-8"), "|module|onejob|")
    names = [row[0] for row in rows]
    assert len(names) == len(set(names)), "a module is mapped twice"
    assert all(len(row) == 2 and row[1] for row in rows), "every row: the module and its one job"


def test_the_parser_reads_a_map_row_with_an_escaped_pipe():
    text = "| module | one job |\n|---|---|\n| `prompts.py` | `{a\\|b}` variants |\n\nafter"
    assert table_after(text, "|module|onejob|") == [["`prompts.py`", "`{a\\|b}` variants"]]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_reach_their_file_and_heading(doc):
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no such heading in {dest.name}")
    assert not broken, f"{doc.name}: {broken}"


def test_slugs_follow_github():
    assert slug("Per-layer (P+, XTI) embeddings") == "per-layer-p-xti-embeddings"
    assert slug("Measuring a word's bias (`textinv bias`)") == "measuring-a-words-bias-textinv-bias"


HISTORY = [r"that morning", r"sharing the cores", r"did not fit an? [\w-]+ budget", r"earlier session",
           r"seed document", r"the seed's", r"(until|before) \d{4}-\d\d"]


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "CHANGELOG.md"], ids=lambda p: p.name)
def test_docs_state_what_is_true_now(doc):
    """Session history and superseded figures belong in CHANGELOG.md, not in the docs."""
    text = doc.read_text(encoding="utf-8").lower()
    found = [m.group(0) for pattern in HISTORY for m in [re.search(pattern, text)] if m]
    assert not found, f"{doc.name} tells history ({found}): move it to CHANGELOG.md or drop it"


def test_the_history_check_catches_the_phrases_it_names():
    told = "until 2026-12-02 the model was v2; all four did not fit a 25-minute budget"
    assert [p for p in HISTORY if re.search(p, told)] == [HISTORY[2], HISTORY[6]]


# The hub moved SD 1.5 to the repository its warnings and examples name; the old id is what a new
# user copies from an old page and then cannot download.
OLD_MODEL_IDS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def test_model_ids_are_spelled_one_way_the_hubs_current_one():
    places = [d for d in DOCS if d.name != "CHANGELOG.md"] + sorted(PACKAGE.rglob("*.py"))
    found = [f"{p.relative_to(ROOT)}:{no}: {old} (write {new})"
             for p in places for no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             for old, new in OLD_MODEL_IDS.items() if old in line]
    assert not found, "old model ids:\n" + "\n".join(found)
    assert all(new in (ROOT / "README.md").read_text(encoding="utf-8") for new in OLD_MODEL_IDS.values())
