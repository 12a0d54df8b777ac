"""`fastnorm bench` end to end on a tiny selection: JSON, markdown report and chart written."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_command_writes_json_report_and_chart(tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "fastnorm", "bench", "--ops", "optim", "--shapes", "mlp",
           "--providers", "reference,torch,torch-fused,numba", "--budget", "0.02", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = json.loads(out.read_text())["benchmarks"]
    providers = {r["extra_info"]["provider"] for r in records}
    assert {"reference", "torch", "torch-fused"} <= providers
    assert all(r["extra_info"]["gbps"] > 0 for r in records)
    md = out.with_suffix(".md").read_text()
    assert "## optim_adam" in md and "% roofline" in md and "roofline:" in md
    assert "| mlp | torch |" in md
    # a provider that cannot run is listed with its reason, not dropped
    assert "torch 2" in md and "has no fused RMSprop" in md
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_bench_command_rejects_unknown_op(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastnorm", "bench", "--ops", "nope"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "unknown op 'nope'" in done.stderr
