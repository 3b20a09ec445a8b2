"""Every ```python block of README.md runs as written, on this machine (CPU or GPU).

Each block runs in a fresh interpreter (a subprocess, in a temporary directory), so a
block cannot lean on names another block defined.  Blocks must run without a GPU or
torchrun (pick the device with ``torch.cuda.is_available()``).  A block that truly
cannot is marked by an HTML comment on the line right above its fence::

    <!-- readme-test: skip (needs torchrun) -->

and is counted and reported as skipped, never run; at most MAX_SKIPS blocks may be.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->")
MAX_SKIPS = 1  # a launch example that needs torchrun at most


def python_blocks(text):
    """[(first line number, code, skip reason or None)] of the ```python fences."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise ValueError(f"README.md:{i + 1}: unclosed ```python block")
            prev = lines[i - 1].strip() if i > 0 else ""
            m = SKIP.fullmatch(prev)
            blocks.append((start + 1, "\n".join(lines[start:j]) + "\n", m.group("why") if m else None))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks(open(README, encoding="utf-8").read())


def test_readme_has_python_blocks_and_few_skips():
    skipped = [(line, why) for line, _, why in BLOCKS if why]
    print(f"\nREADME.md: {len(BLOCKS)} python blocks, {len(skipped)} skipped"
          + "".join(f"\n  line {line}: skip ({why})" for line, why in skipped))
    assert len(BLOCKS) >= 5
    assert len(skipped) <= MAX_SKIPS, f"too many README blocks skipped: {skipped}"


@pytest.mark.parametrize("line,code,skip", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, skip, tmp_path):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    env = {k: v for k, v in os.environ.items() if k not in ("SSLOPS_BACKEND", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"README.md:{line}: the block failed:\n{code}\n--- stderr ---\n{res.stderr[-4000:]}"
