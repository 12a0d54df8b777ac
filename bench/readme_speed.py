"""Write the README's speed table from the published reports (bench/results/cpu.json, then the
whole-step rows of any further report, e.g. bench/results/llama.json).

    python bench/readme_speed.py [bench/results/cpu.json [bench/results/llama.json ...]] [--readme README.md]

Replaces the block between ``<!-- speed-table -->`` and ``<!-- /speed-table -->`` in the README
with rows taken from the report, formatted as bench/results/cpu.md formats them, so every speed
figure in the README is one that appears in the report (tests/test_readme.py checks it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report as rep  # noqa: E402

BEGIN, END = "<!-- speed-table -->", "<!-- /speed-table -->"
FASTNORM = "numba"
#: (op, label, fastnorm provider): the rows of the README's table, every case of each op. BatchNorm
#: twice: the module users call (``numba``: nn module, autograd, buffer pool) and its kernels alone
#: (``numba-kernels``, the partner of ``torch-prealloc``)
OPS = [
    ("batchnorm_forward_backward", "BatchNorm fwd+bwd", FASTNORM),
    ("batchnorm_forward_backward", "BatchNorm fwd+bwd, kernels alone", "numba-kernels"),
    ("batchnorm_forward_backward_bfloat16", "BatchNorm fwd+bwd, bfloat16", FASTNORM),
    ("layernorm_forward_backward", "LayerNorm fwd+bwd", FASTNORM),
    ("layernorm_forward_backward_bfloat16", "LayerNorm fwd+bwd, bfloat16", FASTNORM),
    ("rmsnorm_forward_backward", "RMSNorm fwd+bwd", FASTNORM),
    ("rmsnorm_forward_backward_bfloat16", "RMSNorm fwd+bwd, bfloat16", FASTNORM),
    ("groupnorm_forward_backward", "GroupNorm fwd+bwd", FASTNORM),
    ("groupnorm_forward_backward_bfloat16", "GroupNorm fwd+bwd, bfloat16", FASTNORM),
    ("optim_sgd_momentum", "SGD momentum step", FASTNORM),
    ("optim_adam", "Adam step", FASTNORM),
    ("optim_adamw", "AdamW step", FASTNORM),
    ("optim_adagrad", "Adagrad step", FASTNORM),
    ("optim_rmsprop", "RMSprop step", FASTNORM),
    ("optim_adam_bfloat16", "Adam step, bfloat16", FASTNORM),
]
E2E = "e2e_training_step"


def whole_steps(rows: dict) -> list[str]:
    """The whole-step rows: every fastnorm provider of each case, with the best torch provider."""
    lines = [
        "Whole training steps (forward, loss, backward, Adam step (AdamW for the Llama-style model); "
        "`compiled:` = `torch.compile(model)`):",
        "",
        "| case | fastnorm: median (IQR) | best torch: provider, median | vs best torch [95% CI] "
        "| vs best torch of its mode [95% CI] | peak memory (torch's best) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for case in rep._sorted_cases(rows.get(E2E, {})):
        rs = rows[E2E][case]
        best = next((r for r in rs if r["provider"] == rs[0]["best_torch"]), None)
        if best is None:
            continue
        for r in sorted((r for r in rs if not rep._is_torch(r["provider"])), key=lambda r: r["provider"]):
            memory = f"{rep._fmt_bytes(r.get('peak_bytes'))} ({rep._fmt_bytes(best.get('peak_bytes'))})"
            lines.append(f"| {case} | {r['provider']}: {rep._fmt_spread(r)} | {best['provider']}, "
                         f"{rep._fmt_spread(best)} | {rep._fmt_ratio(r['vs_best_torch'])} "
                         f"| {rep._fmt_ratio(r.get('vs_best_torch_same_mode'))} | {memory} |")  # fmt: skip
    return [*lines, ""]


def table(report: dict, *more: dict) -> str:
    rows = rep.rows_by_case(report["records"])
    roof = rep.roofline(report["records"])
    steps = whole_steps(rows)
    for extra in more:  # further whole-step cases, measured in runs of their own
        steps = steps[:-1] + whole_steps(rep.rows_by_case(extra["records"]))[4:]
    lines = [BEGIN, *steps, "The ops alone:", ""]
    lines += [
        f"Roofline measured in this run: {roof['gbps']:.1f} GB/s ({roof['case']}, {roof['provider']})."
        if roof
        else "No roofline in this run.",
        "",
        "| op | case | fastnorm: median (IQR) | best torch: provider, median | fastnorm vs best torch [95% CI] "
        "| fastnorm vs torch default | fastnorm % roofline |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for op, label, provider in OPS:
        for case in rep._sorted_cases(rows.get(op, {})):
            rs = rows[op][case]
            ours = next((r for r in rs if r["provider"] == provider), None)
            best = next((r for r in rs if r["provider"] == (ours or {}).get("best_torch")), None)
            if ours is None or best is None:
                continue
            default = "—" if ours["vs_torch_default"] is None else f"{ours['vs_torch_default']:.2f}x"
            pct = f"{100 * ours['gbps'] / roof['gbps']:.0f}%" if roof and ours.get("gbps") else "—"
            lines.append(f"| {label} | {case} | {rep._fmt_spread(ours)} | {best['provider']}, {rep._fmt_spread(best)} "
                         f"| {rep._fmt_ratio(ours['vs_best_torch'])} | {default} | {pct} |")  # fmt: skip
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="*", type=Path, default=[Path(__file__).parent / "results" / "cpu.json"])
    ap.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "README.md")
    args = ap.parse_args(argv)
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme}: no {BEGIN} ... {END} block to replace")
    block = table(*(rep.load(j) for j in args.json))
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    args.readme.write_text(text)
    print(f"wrote the speed table of {args.readme} from {', '.join(map(str, args.json))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
