"""The README's commands and example are the ones that work, and every page it leads to is there.

The README is the page a newcomer reads to the end: what denser is, the two Quick start commands,
one example per thing users do, headline results and the docs index. Long sections live in
docs/*.md; the links below are checked so that nothing points at a page or a heading that moved.
"""

import pathlib
import re

import pytest

from denser.cli import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.DOTALL | re.M)


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks (a ``# comment`` there is no heading, a link no link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading anchors on its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", _prose(page.read_text()), flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_is_githubs():
    assert slug("Continual post-training: the experiment that separates the objectives") == (
        "continual-post-training-the-experiment-that-separates-the-objectives")
    assert slug("What SDPO's self-teacher teaches") == "what-sdpos-self-teacher-teaches"
    assert slug("Contract 1: the loss core (`denser.kernels`)") == "contract-1-the-loss-core-denserkernels"
    assert slug("`denser continual`") == "denser-continual"


def test_ci_runs_the_readme_test_command():
    test_cmd = [line for block in _bash_blocks() for line in block.splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(test_cmd) == 1, test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd[0] in ci.splitlines()


def test_main_command_is_denser_train_sdpo():
    main_cmd = [line for block in _bash_blocks() for line in block.splitlines() if "denser train" in line]
    assert main_cmd and main_cmd[0].endswith("denser train --objective sdpo")


def test_token_stats_example_runs():
    block = re.search(r"## The loss core\n\n```python\n(.*?)```", README, flags=re.DOTALL).group(1)
    exec(compile(block, "README-example", "exec"), {})


def broken_links(page: pathlib.Path) -> list[str]:
    """The relative links and images of ``page`` that name no file or folder, or a ``#heading``
    that is not a heading of the page they name."""
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    """Every relative link and image of README.md and docs/*.md names a file or folder of the
    repository, and a ``#heading`` it names is a heading of that page."""
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "x.md"
    (tmp_path / "y.md").write_text("# Other\n\n## A `code` heading: yes\n")
    page.write_text("# Title\n\n[a](missing.md) [b](#title) [c](#nope) ![d](y.md) [e](y.md#a-code-heading-yes)\n"
                    "[f](y.md#other-1) [g](https://example.org/none.md)\n```\n[h](in-code.md)\n# not a heading\n```\n")
    assert anchors(page) == {"title"}
    assert broken_links(page) == ["missing.md: no such file", "#nope: no heading '#nope' in x.md",
                                  "y.md#other-1: no heading '#other-1' in y.md"]


def test_readme_indexes_every_docs_page():
    linked = set(re.findall(r"\]\(docs/([\w\-]+\.md)", README))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_readme_stays_short():
    """A newcomer reads it to the end: results, tables and details go to docs/, one line each here."""
    assert len(README.splitlines()) < 200, "README.md is over 200 lines: move the long section to a docs/ page"


def test_commands_in_the_docs_are_denser_commands():
    """Every ``denser <command>`` line in a code block of README.md or docs/*.md names a command that exists."""
    unknown = []
    for page in PAGES:
        for block in _code_blocks(page.read_text()):
            for line in block.splitlines():
                m = re.match(r"\s*(?:\$ )?denser ([\w-]+)", line)
                if m and m.group(1) not in COMMANDS:
                    unknown.append(f"{page.relative_to(ROOT)}: {line.strip()}")
    assert not unknown, unknown
