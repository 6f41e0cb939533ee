"""The walkthrough is executable: run it whole, and make sure its checker would notice drift.

Also what makes it a first lesson: its length, one time estimate shared with the README, chapters that say
what state they leave, and diagrams that parse.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docs.walkthrough import DOCS, READING_WORDS_PER_MINUTE, ROOT, check_code_links, line_pattern, matches, words
from tests.support import free_ports

pytestmark = pytest.mark.e2e

LESSON = ROOT / "docs" / "walkthrough.md"
README = ROOT / "README.md"
MERMAID_TOOLS = ROOT / "docs" / "tools"


def test_placeholders_and_ellipsis() -> None:
    assert line_pattern("sha256 <sha256>").fullmatch("sha256 " + "ab" * 32)
    assert not line_pattern("sha256 <sha256>").fullmatch("sha256 abc")
    assert matches(["first", "...", "last"], ["first", "x", "y", "last"])
    assert matches(["first", "...", "last"], ["first", "last"])


def test_a_deleted_or_changed_line_is_a_mismatch() -> None:
    actual = ["403 from service-c: …", "  reason: thumbprint is not on the allow-list service-c.txt"]
    assert matches(list(actual), actual)
    assert not matches(actual[:1], actual), "output the document no longer shows must be noticed"
    assert not matches([actual[0], "  reason: something else"], actual)


def test_code_links_point_at_what_they_name() -> None:
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert check_code_links(doc.read_text(), doc.name) == []
    assert check_code_links(README.read_text(), README.name, ROOT) == []
    assert check_code_links("[`no_such_symbol`](../shared/tls/contexts.py#L1)") != []
    assert check_code_links("[part two](operations.md#no-such-chapter)") != []
    assert check_code_links("[gone](no-such-page.md)") != []


def test_the_first_lesson_is_at_most_4500_words() -> None:
    """Every word counts, commands and output included: 4,500 words are about 22 minutes of reading."""
    assert words(LESSON.read_text()) <= 4500


def test_one_time_estimate_measured_and_the_same_in_the_readme() -> None:
    """The lesson states its minutes as reading (its words at 200 a minute) plus its commands' measured run
    time; the README quotes the same minutes."""
    lesson = LESSON.read_text()
    stated = re.search(
        r"\*\*About (\d+) minutes\*\*, measured: ([\d,]+) words at (\d+) a minute, and ([\d.]+) minutes", lesson
    )
    assert stated, "the walkthrough's first line states its minutes and how they were measured"
    minutes, counted, rate = (int(g.replace(",", "")) for g in stated.groups()[:3])
    running = float(stated[4])
    assert rate == READING_WORDS_PER_MINUTE
    assert abs(counted - words(lesson)) <= 50, "the word count in the estimate is out of date"
    assert minutes == round(counted / rate + running)
    quoted = re.findall(r"walkthrough\]\(docs/walkthrough\.md\)\*\* — about (\d+) minutes", README.read_text())
    assert quoted == [str(minutes)], "the README quotes another time than the walkthrough"


def test_every_chapter_says_where_it_starts_and_what_it_leaves() -> None:
    for doc in DOCS:
        chapters = re.split(r"^## ", doc.read_text(), flags=re.M)[1:]
        executed = [c for c in chapters if re.match(r"\d+\. ", c) and "```console" in c]
        assert executed, doc.name
        for chapter in executed:
            title = chapter.splitlines()[0]
            assert "*Leaves:" in chapter, f"{doc.name}, {title}: says not what state it leaves"
            if not title.startswith("0."):
                assert "*Starts:" in chapter, f"{doc.name}, {title}: says not what state it starts from"


def test_the_readme_stays_short() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_every_mermaid_diagram_parses() -> None:
    """With mermaid's own parser (no browser); the forge renders what parses."""
    if shutil.which("node") is None or not (MERMAID_TOOLS / "node_modules" / "mermaid").is_dir():
        pytest.skip("needs node and the parser: npm ci --prefix docs/tools")
    documents = [str(p) for p in sorted((ROOT / "docs").glob("*.md"))] + [str(README)]
    result = subprocess.run(
        ["node", str(MERMAID_TOOLS / "mermaid_check.mjs"), *documents],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") >= 5, "the lesson's five diagrams were parsed"


def test_the_walkthrough_runs_and_prints_what_it_says(tmp_path: Path) -> None:
    """Every command of both documents, in order, against a real local mesh on free ports."""
    ports = ",".join(map(str, free_ports(6)))
    env = {**os.environ, "WALKTHROUGH_TARGET": "local", "WALKTHROUGH_PORTS": ports}
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "walkthrough.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "all steps printed what the document says" in result.stdout
    assert all(f"{doc.name}: " in result.stdout for doc in DOCS), "both documents ran"
