"""The README and docs/ say only what the tree holds: every relative link resolves (to a file, and
an ``#anchor`` to one of its headings), every command shown names a Makefile target, module,
script or config file that exists, every repository path in code resolves, and the README stays
a front door (short, the two commands on its first screen, its main table the committed one)."""

from __future__ import annotations

import glob
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [str(page.relative_to(ROOT)) for page in PAGES]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
TOP_DIRS = "capkv|baselines|scripts|tests|conf|experiments|plots|results|docs|\\.ci"
PATH = re.compile(rf"(?<![\w./~-])((?:{TOP_DIRS})/[^\s`'\"(),;]*)")
DOTTED = re.compile(r"(?<![\w./-])((?:capkv|baselines)(?:\.[A-Za-z_]\w*)+)")
OVERRIDE = re.compile(r"(?<![\w.])(experiment|method|task|model|hydra/launcher)=([^\s'\"]+)")


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def prose(page: Path) -> str:
    """The page without its code: fenced blocks and inline spans removed."""
    return SPAN.sub("CODE", FENCE.sub("", text(page)))


def code(page: Path) -> list[str]:
    """Every fenced block's lines and every inline span of the page (line breaks inside a span
    joined by a space), the places where commands and paths are shown."""
    source = text(page)
    blocks = [line for block in FENCE.findall(source) for line in block.splitlines()[1:-1]]
    indented = [line for line in FENCE.sub("", source).splitlines() if line.startswith("    ")]
    spans = [" ".join(span.split()) for span in SPAN.findall(FENCE.sub("", source))]
    return blocks + indented + spans


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    heading = heading.strip().lower()
    kept = "".join(c for c in heading if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of every heading outside code, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", text(page)).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


@pytest.mark.parametrize("page", [p for p in PAGES if p.parent.name == "docs"], ids=IDS[1:])
def test_images_linked_from_docs_point_one_level_up_to_plots(page):
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", prose(page))
    assert all(image.startswith("../plots/") for image in images), images


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z][\w.-]*(?:[ \t]+[A-Za-z][\w.-]*)*)[ \t]*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_make_target_shown_exists_in_the_makefile(page):
    targets = makefile_targets()
    shown = set()
    for snippet in code(page):
        for match in re.finditer(r"(?<![\w$(-])make((?:[ \t]+[a-z][a-z0-9-]*)+)", snippet):
            shown.update(match.group(1).split())
    assert shown <= targets, f"{page.name}: not in the Makefile: {sorted(shown - targets)}"


def module_file(dotted: str) -> Path | None:
    """The file that ``import dotted`` would load, if the tree has it."""
    base = ROOT / dotted.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_python_module_and_script_shown_exists(page):
    missing = []
    for snippet in code(page):
        for module in re.findall(r"python -m ((?:capkv|baselines)(?:\.\w+)*)", snippet):
            base = ROOT / module.replace(".", "/")
            if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                missing.append(f"python -m {module}")
        for script in re.findall(r"python (\S+\.py)", snippet):
            if not (ROOT / script).is_file():
                missing.append(f"python {script}")
    assert not missing, f"{page.name}: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_dotted_name_shown_is_a_module_or_a_name_defined_in_one(page):
    """``capkv.engine.method.EvictionMethod``: the longest prefix is a module of the tree and
    what follows it, at most one name, occurs in that module."""
    missing = []
    for snippet in code(page):
        for dotted in DOTTED.findall(snippet):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                found = module_file(".".join(parts[:cut]))
                if found:
                    break
            rest = parts[cut:]
            if (
                not found
                or len(rest) > 1
                or (rest and not re.search(rf"\b{rest[0]}\b", found.read_text()))
            ):
                missing.append(dotted)
    assert not missing, f"{page.name}: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_config_named_on_a_command_line_exists(page):
    """``experiment=X``, ``method=X`` (and ``method=a,b`` in a multirun), ``task=X``, ``model=X``
    and ``hydra/launcher=X`` name a yaml of that config group."""
    missing = []
    for snippet in code(page):
        for group, values in OVERRIDE.findall(snippet):
            for value in values.split(","):
                value = value.rstrip(".;:)")
                if not value or re.search(r"[<>{}$]|\.\.\.", value):
                    continue
                if not (ROOT / "conf" / group / f"{value}.yaml").is_file():
                    missing.append(f"{group}={value}")
    assert not missing, f"{page.name}: no such config: {sorted(set(missing))}"


def shown_paths(page: Path) -> set[str]:
    paths = set()
    for snippet in code(page):
        for path in PATH.findall(snippet):
            path = path.rstrip(".:")
            if re.search(r"[<>{}$%]|\.\.\.", path):
                continue
            head, _, alternative = path.partition("|")  # leaderboard.md|png
            paths.add(head)
            if alternative:
                paths.add(f"{Path(head).with_suffix('')}.{alternative}")
    return paths


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_every_repository_path_shown_in_code_exists(page):
    missing = sorted(
        path
        for path in shown_paths(page)
        if not (
            glob.glob(str(ROOT / path), recursive=True) if "*" in path else (ROOT / path).exists()
        )
    )
    assert not missing, f"{page.name}: no such path: {missing}"


def test_the_readme_is_a_front_door_with_the_two_commands_on_its_first_screen():
    lines = text(ROOT / "README.md").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move detail into docs/"
    first_screen = "\n".join(lines[:15])
    assert "make setup" in first_screen and "make test" in first_screen


def test_every_page_of_docs_is_in_the_readme_map():
    links = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    unlisted = [p.name for p in PAGES[1:] if p.resolve() not in links]
    assert not unlisted, f"docs pages missing from the README's map: {unlisted}"


NAMES = {
    "CapKV": "capkv", "SnapKV": "snapkv", "PyramidKV": "pyramidkv", "H2O": "h2o",
    "StreamingLLM": "streamingllm", "random": "random", "full cache": "full",
}  # fmt: skip


def main_table(page: Path) -> list[str]:
    """The rows of the first table whose header starts ``| method | removed |``."""
    lines = text(page).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | removed |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_the_readme_main_table_is_the_committed_main_table_and_docs_results_holds_it():
    committed = {}
    for line in text(ROOT / "results" / "main_table.md").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[0] == "smollm2-135m" and cells[1] == "query_aware":
            committed[(cells[2], cells[3])] = cells[4:]
    readme = main_table(ROOT / "README.md")
    assert readme == main_table(ROOT / "docs" / "results.md")
    for row in readme:
        method, removed, *scores = (c.strip() for c in row.strip("|").split("|"))
        budget = "full" if removed == "0%" else f"ratio{int(removed[:-1]) / 100:g}"
        assert committed[(NAMES[method], budget)] == scores, row
