"""The README's speed figures come from the published report, not from memory."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end != -1 else None]


def test_every_speed_figure_in_the_readme_is_in_the_report():
    readme = _section((ROOT / "README.md").read_text(), "## Speed (this machine's CPU)")
    # the ops and most whole steps: cpu.md; the Llama-style model's steps: a run of their own, llama.md
    report = "".join((ROOT / "bench" / "results" / name).read_text() for name in ("cpu.md", "llama.md"))
    block = readme[readme.index("<!-- speed-table -->") : readme.index("<!-- /speed-table -->")]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith(("| op ", "| case "))]
    assert len(rows) >= 10, "the speed table is empty: run python bench/readme_speed.py"
    assert "Whole training steps" in block.split("The ops alone")[0], "the whole-step rows come first"
    assert any("resnet18" in row and "compiled:fastnorm-numba" in row for row in rows)
    assert any("llama" in row and "eager:fastnorm-numba" in row for row in rows)
    ratios = re.findall(r"\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\](?: tie)?", block)
    assert len(ratios) >= len(rows)
    for figure in ratios:  # speedups with their intervals, exactly as the report prints them
        assert figure in report, figure
    times = re.findall(r"\d[\d,]*\.\d+ (?:µs|ms|s) \([^)]*\)", block)
    assert len(times) >= 2 * len(rows)
    for figure in times:  # medians with their interquartile ranges
        assert figure in report, figure
    # and no other ratio in the section's prose
    prose = readme.replace(block, "")
    assert not re.findall(r"\b\d+\.\d+x\b", prose), "a speedup in the README's prose that the table does not carry"


def test_the_report_says_how_it_was_measured():
    report = (ROOT / "bench" / "results" / "cpu.md").read_text()
    assert "interleaved round by round" in report and "interquartile range" in report
    assert "torch-compiled" in report and "torch-prealloc" in report and "torch-fused" in report
    assert "numba-kernels" in report  # BatchNorm's kernels alone, the partner of torch-prealloc
    assert "channels_last" in report
    assert re.search(r"\| \d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]", report)
