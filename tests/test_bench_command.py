"""`fastnorm bench` end to end on a tiny selection: JSON, markdown report and chart written."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_command_writes_json_report_and_chart(tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "fastnorm", "bench", "--ops", "optim", "--shapes", "mlp",
           "--providers", "reference,torch,torch-fused,numba,cuda", "--budget", "0.01", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [r for r in json.loads(out.read_text())["benchmarks"] if r["extra_info"]["op"].startswith("optim_")]
    assert len(records) >= 9  # the float32 configurations at the MLP's size, at least
    for r in records:
        info = r["extra_info"]
        ran, skipped = info["providers"], info["skipped"]
        assert info["interleaved"] is True
        # every selected provider either ran (15 rounds at least, positive times) or says why not
        assert "numba" in ran and "reference" in ran and "torch" in ran, (info["op"], sorted(ran))
        assert {"torch-foreach", "torch-compiled"} <= set(skipped) and "cuda" in skipped
        assert all(why.strip() for why in skipped.values())
        for name, p in ran.items():
            assert p["rounds"] >= 15 and len(p["samples"]) == p["rounds"], name
            assert min(p["samples"]) > 0 and p["q1"] <= p["median"] <= p["q3"] and p["gbps"] > 0, name
        if info["op"] in ("optim_adam", "optim_sgd_momentum"):
            assert "torch-fused" in ran
    md = out.with_suffix(".md").read_text()
    assert "## optim_adam" in md and "% roofline" in md and "roofline:" in md and "interleaved" in md
    assert "| mlp | numba |" in md
    assert "| mlp | **torch-fused** |" in md or "| mlp | torch-fused |" in md
    assert "[" in md.split("## optim_adam")[1].split("##")[0]  # speedups carry their interval
    # a provider that cannot run is listed with its reason, not dropped
    assert "torch 2" in md and "has no fused RMSprop" in md and "not selected" in md
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_bench_command_rejects_unknown_op(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastnorm", "bench", "--ops", "nope"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0 and "unknown op 'nope'" in done.stderr
