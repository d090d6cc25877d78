"""Every code block of README.md runs as written.

Each ```python block is run on its own, in a fresh interpreter, in an empty folder (so files it
writes land there), and must exit 0.  A block that truly cannot run on a CPU opts out with an
HTML comment on the line right before its fence, giving the reason:

    <!-- readme-test: skip: needs a CUDA device -->

Blocks added to the README later are picked up without touching this file.  ```bash blocks
are checked for syntax and for the scripts they name (running them would run the whole project:
the demo and this very suite).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->$")


@dataclass
class Block:
    lang: str
    line: int       # 1-based line of the opening fence
    code: str
    skip: str | None


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text``, with the skip reason of a marker right before a fence.
    Raises ValueError for an unclosed fence or a marker that is not a valid skip right before one."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip()) if lines[i].startswith("```") else None
        marker = MARKER.match(lines[i].strip())
        if marker:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            reason = re.fullmatch(r"skip:\s*(\S.*)", marker.group(1))
            if not nxt.startswith("```") or reason is None:
                raise ValueError(f"README.md:{i + 1}: a readme-test marker must read "
                                 f"'<!-- readme-test: skip: REASON -->' right before a code fence")
        if m is None:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start + 1}: unclosed code fence")
        prev = MARKER.match(lines[start - 1].strip()) if start else None
        skip = re.fullmatch(r"skip:\s*(\S.*)", prev.group(1)).group(1) if prev else None
        blocks.append(Block(m.group(1), start + 1, "\n".join(body) + "\n", skip))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang in ("bash", "sh", "console")]


def test_readme_has_runnable_examples():
    assert len(PYTHON) >= 3 and all(b.code.strip() for b in BLOCKS)
    assert not [b for b in BLOCKS if b.lang == ""], "give every code block a language (```python, ```bash)"


@pytest.mark.parametrize("block", PYTHON, ids=[f"python-line{b.line}" for b in PYTHON])
def test_python_block_runs(block, tmp_path):
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    script = tmp_path / f"readme_line{block.line}.py"
    script.write_text(block.code)
    # as a reader runs it: without the Triton interpreter that conftest.py switches on for the
    # suite (it would make every Triton-backed op crawl; a block that needs it sets it itself)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (f"README.md:{block.line}: the block fails:\n{block.code}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")


@pytest.mark.parametrize("block", BASH, ids=[f"bash-line{b.line}" for b in BASH])
def test_bash_block_parses_and_names_existing_scripts(block):
    proc = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    assert proc.returncode == 0, f"README.md:{block.line}: {proc.stderr}"
    for script in re.findall(r"(?:^|\s)bash\s+(\S+\.sh)\b", block.code):
        assert (ROOT / script).is_file(), f"README.md:{block.line}: {script} does not exist"


def test_markers_and_fences_are_checked():
    text = "a\n<!-- readme-test: skip: needs a GPU -->\n```python\nx = 1\n```\n```bash\nls\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.line, b.skip) for b in blocks] == [("python", 3, "needs a GPU"), ("bash", 6, None)]
    with pytest.raises(ValueError, match="README.md:2: a readme-test marker"):
        readme_blocks("a\n<!-- readme-test: skip -->\n```python\nx\n```\n")  # no reason
    with pytest.raises(ValueError, match="README.md:1: a readme-test marker"):
        readme_blocks("<!-- readme-test: skip: why -->\n\n```python\nx\n```\n")  # not right before
    with pytest.raises(ValueError, match="unclosed"):
        readme_blocks("```python\nx = 1\n")
