"""The documentation is tested: README.md and every page of docs/ as a newcomer follows them.

- Every fenced block names its language (or is marked). ``bash``/``sh`` and ``python`` blocks are commands: each
  is either run here or marked, visibly, in the Markdown by the line just before it (or once for a
  whole page) ``*Not run by the documentation test: <reason>.*`` (e.g. it needs Slicer's GUI, a GPU,
  a Ray cluster, or it is the full demo). ``text`` blocks are printed output or sketches, not run.
- The command blocks are run in order, one folder per page, with the session's quick demo as
  ``demo_output/`` (the pages are written for the full demo, ``bash scripts/demo.sh``; ``QUICK``
  maps its dataset and case names to the quick demo's), with real bash and this environment's
  ``calib-uncertainty`` and Python.
- Links: every relative link of these pages points to a file (and heading) of the repository; the
  README links nothing outside it and is at most 250 lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARK = re.compile(r"^\*Not run by the documentation test( \(every block on this page\))?: (.+)\*$")
COMMAND_LANGS = {"bash": "bash", "sh": "bash", "python": "python"}
OUTPUT_LANGS = {"text"}
#: the full demo's names (what the pages say) -> the quick demo's (what the suite has)
QUICK = [("Dataset990_CalibPhantomDemo", "Dataset989_CalibPhantomQuick"), ("-d 990 ", "-d 989 "),
         ("phantom_010 phantom_011 phantom_012 phantom_013", "phantom_005 phantom_006"),
         ("phantom_014", "phantom_007"), ("phantom_015", "phantom_008")]
#: links to pages other branches add (merged by the integrator); empty once they are in


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    skip_reason: str | None

    def __str__(self):
        return f"{self.page.relative_to(REPO)}:{self.line} ({self.lang})"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").split("\n")
    page_reason = next((m.group(2) for ln in lines if (m := MARK.match(ln.strip())) and m.group(1)), None)
    out, i = [], 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            lang = ln[3:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = MARK.match(prev)
            reason = m.group(2) if m and not m.group(1) else page_reason
            out.append(Block(page, i + 1, lang, "\n".join(lines[i + 1:j]), reason))
            i = j + 1
        else:
            i += 1
    return out


def runnable(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in COMMAND_LANGS and not b.skip_reason]


def test_every_block_is_run_or_marked_with_a_reason():
    assert len(PAGES) >= 6  # README, COMMANDS, SLICER, METHODS, BENCHMARKS, ARCHITECTURE
    for page in PAGES:
        for b in blocks(page):
            assert b.lang in COMMAND_LANGS or b.lang in OUTPUT_LANGS or b.skip_reason, \
                f"{b}: every block names its language (bash, python, or text for output), or is marked"
            if b.skip_reason is not None:
                assert len(b.skip_reason) > 15, f"{b}: a marked block says why it is not run"
    ran = {p.name: len(runnable(p)) for p in PAGES}
    assert ran["README.md"] >= 4 and ran["COMMANDS.md"] >= 2 and ran["SLICER.md"] >= 1, ran
    readme = [b.code for b in runnable(REPO / "README.md")]
    assert any("calib-uncertainty review --outputs demo_output/maps/deep -o sheets" in c for c in readme)


def _anchor(heading: str) -> str:
    text = heading.strip().lstrip("#").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def test_links_stay_in_the_repository_and_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.split("\n")) <= 251, "README.md is at most 250 lines"
    assert "../shared" not in readme and "this machine" not in readme
    assert not re.findall(r"\]\((?:https?|ftp):", readme), "README.md links outside the repository"
    missing = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve()
            assert resolved.is_relative_to(REPO), f"{page.name} links outside the repository: {target}"
            rel = resolved.relative_to(REPO).as_posix()
            if not resolved.exists():
                missing[rel] = page.name
                continue
            if anchor and resolved.suffix == ".md":
                heads = {_anchor(h) for h in re.findall(r"^#+ .*$", resolved.read_text(encoding="utf-8"), re.M)}
                assert anchor in heads, f"{page.name}: {target}: no heading #{anchor} in {rel}"
    assert not missing, f"links to files that do not exist: {missing}"


@pytest.fixture(scope="module")
def doc_env(tmp_path_factory) -> dict:
    """The environment the blocks run in, one cache folder for the module (the time per network pass
    one block measures serves the next block's estimate, as on a user's machine)."""
    return _env(tmp_path_factory.mktemp("doc_env"))


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "CALIBU_PROGRESS"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env["CALIBU_CACHE_DIR"] = str(tmp_path / "cache")
    env["MPLBACKEND"] = "Agg"
    return env


def _quick(code: str) -> str:
    for full, quick in QUICK:
        code = code.replace(full, quick)
    return code


def run_page(page: Path, workdir: Path, demo: Path, env: dict) -> list[tuple[Block, str]]:
    """Run every runnable block of ``page`` in ``workdir`` (``demo_output`` -> the quick demo)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "demo_output").symlink_to(demo, target_is_directory=True)
    out = []
    for b in runnable(page):
        code = _quick(b.code)
        leftover = re.findall(r"Dataset990|phantom_01\d|-d 990\b", code)
        assert not leftover, f"{b}: names the full demo's {leftover}, which QUICK does not map"
        argv = ["bash", "-euo", "pipefail", "-c", code] if COMMAND_LANGS[b.lang] == "bash" else \
            [sys.executable, "-c", code]
        r = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, \
            f"{b} failed (exit {r.returncode}):\n{code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
        out.append((b, r.stdout + r.stderr))
    return out


def test_readme_journeys_run_on_the_quick_demo(quick_demo, doc_env, tmp_path):
    demo, _ = quick_demo
    work = tmp_path / "readme"
    results = run_page(REPO / "README.md", work, demo, doc_env)
    text = "\n".join(t for _, t in results)
    # journey 1: review sheets without Slicer, and the scripted review in a real MRML scene
    assert sorted(p.name for p in (work / "sheets").glob("*.png")) == ["phantom_007_review.png", "phantom_008_review.png"]
    assert re.search(r"R1 \w+ \d+ mm³ at RAS \[", text)
    # journey 2: nnU-Net's names for the model; estimate before inference; the case's verdict
    cal = (work / "my_calibration.json").read_text()
    assert '"tta": false' in cal and '"kind": "deep"' in cal
    assert re.search(r"phantom_007: CT \d+×\d+×\d+ voxels at .* mm, resampled to \d+×\d+×\d+ .* network passes, "
                     r"about .* of inference on cpu", text)
    assert re.search(r"phantom_007: .*error region|phantom_007: no error region", text)
    assert "trivial guarantee" in text  # 2 calibration cases: said so wherever the guarantee is stated
    assert (work / "my_sheets" / "phantom_007_review.png").is_file()
    # journey 3: member folders -> calibration, maps, evaluation
    assert sorted(p.name for p in (work / "maps").iterdir() if p.is_dir()) == ["phantom_007", "phantom_008"]
    report = (work / "evaluation" / "report.md").read_text()
    assert "**Every guarantee below is the trivial one**" in report


def test_docs_pages_run_on_the_quick_demo(quick_demo, doc_env, tmp_path):
    demo, _ = quick_demo
    env = doc_env
    ran = 0
    for page in PAGES[1:]:
        if runnable(page):
            ran += len(run_page(page, tmp_path / page.stem, demo, env))
    assert ran >= 3
    assert (tmp_path / "COMMANDS" / "out_checkpoint" / "phantom_008" / "summary.json").is_file()
    assert sorted(p.name for p in (tmp_path / "SLICER" / "sheets").glob("*.html"))
