"""The documentation stands on its own: README is a short front page, every relative link and image
of README.md and docs/ resolves, every page is in the site's nav, and nothing in the repository
refers to files that users do not have. (`make docs` builds the site with `mkdocs build --strict`,
which checks the same links and the #anchors too; these tests need no MkDocs.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target "title") and ![alt](target); the text may hold one level of [...] (image links)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\s[^>]*?(?:src|href)=["']([^"']+)["']""", re.I)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//|#)", re.I)

# Files users do not have: built from parts so that this file does not match itself.
OUTSIDE_REFERENCES = re.compile(
    r"(?<![\w-])" + "methods" + r"\.md\b"
    r"|shared/" + "reference"
    r"|lecture[- ]" + "notes"
    r"|\.\./" + "shared",
    re.I,
)


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def links(markdown: str) -> list[str]:
    """Relative link and image targets outside code blocks and code spans, without #anchors."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    targets = [m.group(1) for m in LINK.finditer(text)] + [m.group(1) for m in HTML_SRC.finditer(text)]
    return [t.split("#", 1)[0] for t in targets if not EXTERNAL.match(t)]


def broken_links(path: Path) -> list[str]:
    """Targets of `path` that are not files, or (for a docs page) that leave docs/, where MkDocs cannot follow."""
    broken = []
    for target in links(path.read_text(encoding="utf-8")):
        resolved = (path.parent / target).resolve()
        if not resolved.is_file():
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif DOCS in path.parents and DOCS not in resolved.parents:
            broken.append(f"{path.relative_to(ROOT)}: {target} (outside docs/: not part of the site)")
    return broken


def test_link_finder_sees_links_and_images_but_not_code():
    text = (
        'See [a](a.md#x), ![img](images/i.png), [[b]](b.md "title"), <img src="c.png">, '
        "[web](https://example.com), [here](#anchor), `[code](no.md)`.\n"
        "```\n[fenced](no2.md)\n```\n"
    )
    assert links(text) == ["a.md", "images/i.png", "b.md", "c.png"]


def test_every_relative_link_and_image_resolves():
    broken = [b for path in markdown_files() for b in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [
        str(p.relative_to(DOCS))
        for p in DOCS.rglob("*.md")
        if f" {p.relative_to(DOCS).as_posix()}\n" not in nav
    ]
    assert not missing, f"docs pages missing from nav in mkdocs.yml: {missing}"


def test_readme_is_a_short_front_page_that_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200, "README.md is the front page: move details into a docs/ page"
    first_block = re.search(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    assert first_block, "README.md has no code block"
    assert "make train" in first_block.group(1) and "make test" in first_block.group(1)


def repository_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the list of repository files comes from git ls-files")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def test_nothing_refers_to_files_outside_the_repository():
    offenders = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (images, checkpoints)
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, (
        "references to files users do not have (cite the paper or a docs page):\n" + "\n".join(offenders)
    )


def test_outside_reference_pattern_matches_what_it_names():
    for line in [
        "see " + "methods" + ".md §3",
        "lecture " + "notes, ch. 2",
        "../" + "shared/x",
        "shared/" + "reference/",
    ]:
        assert OUTSIDE_REFERENCES.search(line), line
    for line in ["docs/methods/index.md", "ssl_" + "methods" + ".md", "lightning_gen/methods/base.py"]:
        assert not OUTSIDE_REFERENCES.search(line), line


def table_rows_with_wrong_cell_counts(markdown: str) -> list[str]:
    """Rows of every markdown table (outside code blocks) whose number of cells differs from the header's,
    or that do not start at the margin (a row cut short reads as a continuation of nothing)."""

    def cells(line: str) -> int:
        line = re.sub(r"\$[^$\n]*\$", "m", CODE_SPAN.sub("c", line.strip()))  # a | inside code or maths
        return len(line.strip("|").split("|"))

    lines, bad, i = FENCE.sub("", markdown).splitlines(), [], 0
    while i < len(lines) - 1:
        if lines[i].lstrip().startswith("|") and re.match(r"^\s*\|?\s*:?-{3,}", lines[i + 1]):
            width, i = cells(lines[i]), i + 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                if cells(lines[i]) != width or not lines[i].startswith("|"):
                    bad.append(lines[i].strip()[:80])
                i += 1
        else:
            i += 1
    return bad


def test_every_table_row_has_its_headers_cells():
    assert table_rows_with_wrong_cell_counts("| a | b |\n|---|---|\n| 1 | `x|y` |\n | 2 |\n") == ["| 2 |"]
    bad = {
        str(p.relative_to(ROOT)): table_rows_with_wrong_cell_counts(p.read_text()) for p in markdown_files()
    }
    assert not {k: v for k, v in bad.items() if v}, "table rows cut short or with extra cells"


BENCHMARK_SCRIPT = re.compile(r"benchmarks/[\w-]+\.(?:py|sh)")


def test_every_benchmark_script_named_in_docs_configs_and_code_exists():
    """Experiments, docs and help texts tell users which script reproduces a number: it must be there."""
    assert BENCHMARK_SCRIPT.findall("see benchmarks/ldm_fashion_mnist.py and benchmarks/x.sh.") == [
        "benchmarks/ldm_fashion_mnist.py",
        "benchmarks/x.sh",
    ]
    sources = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "conf").rglob("*.yaml")]
    sources += [*(ROOT / "lightning_gen").rglob("*.py"), *(ROOT / "benchmarks").glob("*.*")]
    missing = {
        f"{source.relative_to(ROOT)}: {name}"
        for source in sources
        for name in BENCHMARK_SCRIPT.findall(source.read_text(errors="replace"))
        if not (ROOT / name).is_file()
    }
    assert not missing, sorted(missing)
