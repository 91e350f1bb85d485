"""The README's and the docs' code runs as written, so that it cannot drift from the code.

- Every ```python block of README.md and docs/*.md runs, in order, in one namespace per file,
  from an empty folder (so a block cannot lean on a relative path that happens to exist). A
  block right after the HTML comment ``<!-- not run: REASON -->`` is an interface sketch and is
  skipped; the comment says why. A ```python block followed by a ```text block that starts with
  ``# prints`` must print exactly the rest of that block.
- Every ``quantref ...`` line of a ```bash block parses with the CLI's own parser: each option
  exists, on a command that takes it, with a value it accepts.
- The README's expected output of ``quantref ppl`` is what the command prints (less its speed).

Files whose blocks load the real model (``load(``, ``model_path(``) need it (marker ``model``).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LOADS_MODEL = re.compile(r"\bload\(|\bmodel_path\(")  # an example that needs the real model

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not run:[^>]*-->\s*$")


def blocks(doc: str) -> list[tuple[str, str, int, bool]]:
    """(language, code, line number, skipped) of each fenced block of ``doc``."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1,
                    bool(NOT_RUN.search(before))))
    return out


def _runnable(doc: str) -> list[str]:
    return [code for lang, code, _, skipped in blocks(doc) if lang == "python" and not skipped]


def _needs_model(doc: str) -> bool:
    return any(LOADS_MODEL.search(code) for code in _runnable(doc))


# Examples too slow for the README's test command (.ci/run runs them with -m slow): why.
SLOW_DOCS = {"docs/sampling.md": "40 sampled tokens of the real model, 30 s of CPU time"}


def _params():
    for doc in DOCS:
        if _runnable(doc):
            marks = [pytest.mark.model] if _needs_model(doc) else []
            marks += [pytest.mark.slow] if doc in SLOW_DOCS else []
            yield pytest.param(doc, marks=marks, id=doc)


@pytest.mark.parametrize("doc", list(_params()))
def test_python_blocks_run_as_written(doc, tmp_path, monkeypatch, request):
    if _needs_model(doc):
        request.getfixturevalue("default_model_path")  # fetched once, before the clock starts
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    found = blocks(doc)
    ran = 0
    for i, (lang, code, line, skipped) in enumerate(found):
        if lang != "python" or skipped:
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{doc}:{line}", "exec"), namespace)  # noqa: S102 - our own docs
        ran += 1
        nxt = found[i + 1] if i + 1 < len(found) else None
        if nxt and nxt[0] == "text" and nxt[1].startswith("# prints"):
            want = nxt[1].split("\n", 1)[1]
            assert out.getvalue() == want, f"{doc}:{line} printed\n{out.getvalue()}"
    assert ran, f"{doc}: no python block ran"


def test_sketches_are_marked_and_say_why():
    """Only blocks that cannot run are skipped, and each skip says why."""
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for m in re.finditer(r"<!--\s*not run:([^>]*)-->", text):
            assert len(m.group(1).strip()) > 10, f"{doc}: a skip without a reason"


def _quantref_lines(doc: str) -> list[tuple[int, list[str]]]:
    lines = []
    for lang, code, line, _ in blocks(doc):
        if lang not in ("bash", "sh", "console"):
            continue
        joined = code.replace("\\\n", " ")  # a command continued over lines is one command
        for k, raw in enumerate(joined.splitlines()):
            cmd = raw.split(" #", 1)[0].strip().removeprefix("$ ")
            for part in cmd.split("&&"):
                if part.strip().startswith("quantref "):
                    lines.append((line + 1 + k, shlex.split(part)[1:]))
    return lines


def test_shell_commands_parse():
    from quantref.cli import build_parser

    parser = build_parser()
    seen = 0
    for doc in DOCS:
        for line, argv in _quantref_lines(doc):
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"{doc}:{line}: quantref {' '.join(argv)} does not parse ({e})")
            seen += 1
    assert seen >= 8  # the README alone shows more; a broken extraction would find none


def readme_expected_ppl_output() -> str:
    """The README's block of what ``quantref ppl`` prints (the one after the line
    ``quantref ppl`` in the quick start)."""
    found = blocks("README.md")
    for (lang, code, *_), nxt in zip(found, found[1:]):
        if lang == "bash" and re.search(r"^quantref ppl\s*$", code, re.M) and nxt[0] == "text":
            return nxt[1]
    raise AssertionError("README.md shows no output of `quantref ppl`")


@pytest.mark.model
@pytest.mark.slow
def test_readme_shows_what_quantref_ppl_prints(default_model_path):
    """The main job, as a newcomer runs it: the README's expected output, less the speed line
    (it depends on the machine), is exactly what ``quantref ppl`` prints. Slow: one pass over
    4,497 tokens took 167 s of CPU time on a loaded 2-core machine."""
    p = subprocess.run([sys.executable, "-m", "quantref.cli", "ppl", "--backend", "numpy"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr

    def stable(text: str) -> list[str]:
        rows = [line.rstrip() for line in text.strip().splitlines()]
        # the speed is the machine's
        return [re.sub(r"^speed .*", "speed", line) for line in rows]

    assert stable(p.stdout) == stable(readme_expected_ppl_output())
