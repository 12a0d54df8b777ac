"""Turn a pytest-benchmark JSON file into the speed report: markdown tables and a PNG chart.

    python bench/report.py bench/results/cpu.json            # writes cpu.md and cpu.png beside it

For every op and case (shape or parameter count) one row per provider: the median time, the
speedup against the best PyTorch provider and against PyTorch's default, the achieved GB/s
(bytes of the minimal algorithm / median) and its percent of the bandwidth roofline measured in
the same run (CPU: best in-place ``a += s*b``; GPU: device-to-device copy).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

TORCH_DEFAULT = {"e2e_mlp_bn_adam_step": "bn:torch+opt:torch"}


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    records = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "op" not in info or not b.get("stats"):
            continue
        records.append({**info, "median": b["stats"]["median"], "rounds": b["stats"]["rounds"],
                        "iqr": b["stats"].get("iqr", 0.0)})  # fmt: skip
    machine = data.get("machine_info", {})
    return {"records": records, "machine": machine, "skipped": machine.get("fastnorm_skipped", {}),
            "datetime": data.get("datetime")}  # fmt: skip


def roofline(records: list[dict]) -> dict | None:
    """The reference record: best in-place update on CPU, device-to-device copy on GPU."""
    roofs = [r for r in records if r["op"] == "roofline"]
    if not roofs:
        return None
    copies = [r for r in roofs if r["case"] == "d2d_copy"]
    pool = copies or [r for r in roofs if r["case"] == "inplace_axpy"]
    return max(pool, key=lambda r: r["gbps"])


def _is_torch(provider: str) -> bool:
    return provider.startswith("torch") or provider.startswith("bn:torch+opt:torch")


def _default_torch(op: str) -> str:
    return TORCH_DEFAULT.get(op, "torch")


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:,.2f} ms"
    return f"{seconds:,.2f} s"


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def rows_by_case(records: list[dict]) -> dict:
    """{op: {case: [record, ...]}} with speedups filled in."""
    table: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["op"] != "roofline":
            table[r["op"]][r["case"]].append(r)
    for op, cases in table.items():
        for _case, rows in cases.items():
            torch_rows = [r for r in rows if _is_torch(r["provider"])]
            best = min((r["median"] for r in torch_rows), default=None)
            default = next((r["median"] for r in rows if r["provider"] == _default_torch(op)), None)
            for r in rows:
                r["vs_best_torch"] = best / r["median"] if best else None
                r["vs_torch_default"] = default / r["median"] if default else None
            rows.sort(key=lambda r: r["median"])
    return table


def markdown(report: dict, title: str) -> str:
    records, machine = report["records"], report["machine"]
    fn = machine.get("fastnorm", {})
    roof = roofline(records)
    table = rows_by_case(records)
    lines = [f"# {title}", ""]
    versions = fn.get("versions", {})
    lines += [
        f"- date: {fn.get('date', report.get('datetime'))}",
        f"- device: {fn.get('device', '?')}" + (f" ({fn['gpu']})" if fn.get("gpu") else ""),
        f"- CPU: {fn.get('cpu_model', '?')}, {fn.get('logical_cpus', '?')} logical CPUs "
        f"(Numba threads {fn.get('numba_threads', '?')}, torch threads {fn.get('torch_threads', '?')})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- backends usable: {', '.join(fn.get('backends', []))}" + ("; quick mode" if fn.get("quick") else ""),
        "- times are medians over many rounds after warm-up; speedups are ratios of medians measured "
        "side by side in this one run",
    ]
    if roof:
        lines.append(
            f"- roofline: {roof['gbps']:.1f} GB/s ({roof['case']} by {roof['provider']}, best of "
            + ", ".join(f"{r['provider']} {r['gbps']:.1f}" for r in records if r["op"] == "roofline")
            + " GB/s)"
        )
    lines.append("")
    for op in sorted(table):
        lines += [f"## {op}", ""]
        has_bytes = any(r.get("bytes") for cs in table[op].values() for r in cs)
        head = "| case | provider | median | vs best torch | vs torch default |"
        sep = "|---|---|---:|---:|---:|"
        if has_bytes:
            head += " GB/s | % roofline |"
            sep += "---:|---:|"
        lines += [head, sep]
        for case in _sorted_cases(table[op]):
            for r in table[op][case]:
                row = (f"| {case} | {r['provider']} | {_fmt_time(r['median'])} | "
                       f"{_fmt_ratio(r['vs_best_torch'])} | {_fmt_ratio(r['vs_torch_default'])} |")  # fmt: skip
                if has_bytes:
                    pct = f"{100 * r['gbps'] / roof['gbps']:.0f}%" if roof and r.get("gbps") else "—"
                    row += f" {r.get('gbps', 0):.1f} | {pct} |"
                lines.append(row)
        lines.append("")
    compiled = [r for r in records if r["provider"] in ("numba", "cuda") and "compile_s" in r]
    if compiled:
        lines += ["## First call (compilation or on-disk cache load) minus steady state", "",
                  "| op | case | provider | first call - median |", "|---|---|---|---:|"]  # fmt: skip
        for r in sorted(compiled, key=lambda r: -r["compile_s"])[:20]:
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {_fmt_time(r['compile_s'])} |")
        lines.append("")
    if report["skipped"]:
        lines += ["## Skipped providers and cases", "", "| reason | benchmarks |", "|---|---:|"]
        by_reason: dict = defaultdict(int)
        for reason in report["skipped"].values():
            by_reason[reason] += 1
        for reason, count in sorted(by_reason.items()):
            lines.append(f"| {reason} | {count} |")
        lines.append("")
    return "\n".join(lines)


def _sorted_cases(cases: dict) -> list[str]:
    def key(case: str):
        nums = [int(x) for x in case.replace("M", "000000").replace("B", "000000000").split("x") if x.isdigit()]
        return (math.prod(nums) if nums else 0, case)

    return sorted(cases, key=key)


def chart(report: dict, path: Path, title: str) -> None:
    """Speedup of each fastnorm provider over PyTorch's default, per op and case (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows_by_case(report["records"])
    families = [("BatchNorm", lambda op: op.startswith("batchnorm")),
                ("Optimizer step", lambda op: op.startswith("optim")),
                ("MLP training step", lambda op: op.startswith("e2e"))]  # fmt: skip
    panels = []
    for label, match in families:
        bars = []
        for op in sorted(o for o in table if match(o)):
            for case in _sorted_cases(table[op]):
                for r in table[op][case]:
                    if not _is_torch(r["provider"]) or r["provider"] != _default_torch(op):
                        if r["vs_torch_default"]:
                            name = op.replace("batchnorm_", "").replace("optim_", "").replace("e2e_", "")
                            bars.append((f"{name} {case}", r["provider"], r["vs_torch_default"]))
        if bars:
            panels.append((label, bars))
    if not panels:
        return
    heights = [max(2.0, 0.16 * len(b)) for _, b in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 1), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    providers = sorted({p for _, bars in panels for _, p, _ in bars})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    for ax, (label, bars) in zip(axes[:, 0], panels):
        ys = range(len(bars))
        ax.barh(list(ys), [b[2] for b in bars], color=[colors[b[1]] for b in bars])
        ax.set_yticks(list(ys), [f"{b[0]} · {b[1]}" for b in bars], fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(f"{label}: speedup over PyTorch's default (>1 is faster)", fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(json_path: Path, title: str | None = None) -> tuple[Path, Path]:
    json_path = Path(json_path)
    report = load(json_path)
    title = title or f"fastnorm benchmark: {json_path.stem}"
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(markdown(report, title) + f"\n![chart]({png_path.name})\n")
    chart(report, png_path, title)
    return md_path, png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    md, png = write(args.json, args.title)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
