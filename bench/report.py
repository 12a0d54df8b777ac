"""Turn a benchmark JSON file (``fastnorm bench``) into the speed report: markdown tables and a chart.

    python bench/report.py bench/results/cpu.json            # writes cpu.md and cpu.png beside it

Every comparison in the JSON timed its providers side by side, interleaved in a shuffled order
per round (bench/conftest.py). For every op and case one row per provider: the median time with
its interquartile range, the speedup against the best PyTorch provider of that case with a
bootstrap 95% interval (a tie when the interval contains 1.0), the speedup against PyTorch's
default, the achieved GB/s (bytes of the minimal algorithm / median) and its percent of the
bandwidth roofline measured in the same run (CPU: best in-place ``a += s*b``; GPU: best of
torch's device-to-device copy and in-place update).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import ratio  # noqa: E402

TORCH_DEFAULT = {"e2e_training_step": "eager:torch"}
#: ops whose providers are named ``mode:variant`` (eager or compiled model): their tables also give
#: the speedup against the best torch provider of the same mode, and each provider's peak memory
MODE_OPS = {"e2e_training_step"}
#: the ops drawn in the chart (every op is in the tables)
CHART_OPS = [
    "batchnorm_forward_backward", "batchnorm_forward_backward_bfloat16", "optim_sgd_momentum", "optim_adam",
    "optim_adamw", "optim_adagrad", "optim_rmsprop", "optim_adam_bfloat16", "e2e_training_step",
]  # fmt: skip


def load(path: Path) -> dict:
    """Records, one per (op, case, provider), from a JSON written by the bench suites."""
    data = json.loads(Path(path).read_text())
    records = []
    for b in data["benchmarks"]:
        info = dict(b.get("extra_info", {}))
        providers = info.pop("providers", None)
        if "op" not in info or not providers:
            continue
        info.pop("skipped", None)
        for name, p in providers.items():
            records.append({**info, **p, "provider": name})
    machine = data.get("machine_info", {})
    return {"records": records, "machine": machine, "skipped": machine.get("fastnorm_skipped", {}),
            "datetime": data.get("datetime")}  # fmt: skip


def roofline(records: list[dict]) -> dict | None:
    """The reference record: the best bandwidth of the roofline comparison."""
    roofs = [r for r in records if r["op"] == "roofline"]
    return max(roofs, key=lambda r: r["gbps"]) if roofs else None


def mode_of(provider: str) -> str | None:
    """``eager`` or ``compiled`` for a ``mode:variant`` provider of the whole-step comparisons, else None."""
    return provider.split(":", 1)[0] if ":" in provider else None


def _is_torch(provider: str) -> bool:
    return provider.split(":", 1)[-1].startswith("torch")


def _default_torch(op: str) -> str:
    return TORCH_DEFAULT.get(op, "torch")


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:,.2f} ms"
    return f"{seconds:,.2f} s"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:,.1f} MB"


MODE_NOTE = (
    "Providers `eager:<variant>` run the model as built, `compiled:<variant>` under `torch.compile(model)` (the "
    "optimizer outside it); variants: `torch` (torch's BatchNorm, default Adam), `torch-fused` (`fused=True`), "
    "`torch-compiled` (default Adam, `step` under `torch.compile`), `fastnorm-numba` / `fastnorm-auto` (every "
    "BatchNorm converted with `fastnorm.nn.convert`, `fastnorm.optim.Adam`, that backend). Peak memory: on CPU "
    "the growth of the process's peak resident set during one step after freed heap memory was returned to the "
    "OS (buffers kept between steps, fastnorm's output pools among them, are not counted); on CUDA the peak of "
    "torch's allocator above the memory allocated before the step. First call: the first step's time "
    "(compilation for `compiled:` providers and `torch-compiled`)."
)


def _fmt_spread(r: dict) -> str:
    scale, unit = (1e6, "µs") if r["median"] < 1e-3 else (1e3, "ms") if r["median"] < 1 else (1, "s")
    return f"{r['median'] * scale:,.{1 if unit == 'µs' else 2}f} {unit} ({r['q1'] * scale:,.3g}-{r['q3'] * scale:,.3g})"


def _fmt_ratio(rt) -> str:
    if rt is None:
        return "—"
    text = f"{rt.value:.2f}x [{rt.low:.2f}-{rt.high:.2f}]"
    return text + " tie" if rt.tie else text


def rows_by_case(records: list[dict]) -> dict:
    """{op: {case: [record, ...]}} sorted by median, with speedups against the best torch
    provider (``vs_best_torch``, a :class:`paired.Ratio`) and torch's default filled in."""
    table: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["op"] != "roofline":
            table[r["op"]][r["case"]].append(r)
    for op, cases in table.items():
        for _case, rows in cases.items():
            torch_rows = [r for r in rows if _is_torch(r["provider"])]
            best = min(torch_rows, key=lambda r: r["median"], default=None)
            default = next((r for r in rows if r["provider"] == _default_torch(op)), None)
            for r in rows:
                r["best_torch"] = best["provider"] if best else None
                r["vs_best_torch"] = ratio(best["samples"], r["samples"]) if best else None
                r["vs_torch_default"] = default["median"] / r["median"] if default else None
                mode = mode_of(r["provider"])
                same = [t for t in torch_rows if mode is not None and mode_of(t["provider"]) == mode]
                best_same = min(same, key=lambda t: t["median"], default=None)
                r["best_torch_same_mode"] = best_same["provider"] if best_same else None
                r["vs_best_torch_same_mode"] = ratio(best_same["samples"], r["samples"]) if best_same else None
            rows.sort(key=lambda r: r["median"])
    return table


def _sorted_cases(cases) -> list[str]:
    def key(case: str):
        nums = [int(x) for x in case.split("-")[0].replace("M", "000000").replace("B", "000000000").split("x")
                if x.isdigit()]  # fmt: skip
        prod = 1
        for n in nums:
            prod *= n
        return (prod if nums else 0, case)

    return sorted(cases, key=key)


def markdown(report: dict, title: str, table: dict | None = None) -> str:
    records, machine = report["records"], report["machine"]
    fn = machine.get("fastnorm", {})
    roof = roofline(records)
    table = table or rows_by_case(records)
    rounds = [r["rounds"] for r in records]
    lines = [f"# {title}", ""]
    versions = fn.get("versions", {})
    lines += [
        f"- date: {fn.get('date', report.get('datetime'))}",
        f"- device: {fn.get('device', '?')}" + (f" ({fn['gpu']})" if fn.get("gpu") else ""),
        f"- CPU: {fn.get('cpu_model', '?')}, {fn.get('logical_cpus', '?')} logical CPUs "
        f"(Numba threads {fn.get('numba_threads', '?')}, torch threads {fn.get('torch_threads', '?')})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- backends usable: {', '.join(fn.get('backends', []))}" + ("; quick mode" if fn.get("quick") else ""),
        "- **how it was measured**: the providers of each case were interleaved round by round, each called once "
        "per round in an order shuffled per round, after a warm-up (first call timed apart: compile or cache "
        f"load); {min(rounds, default=0)}-{max(rounds, default=0)} rounds per provider. Times are medians with "
        "their interquartile range in parentheses; speedups are ratios of medians with a bootstrap 95% interval "
        "in brackets, and read **tie** when that interval contains 1.0.",
        "- speedups are against the **best torch provider** of each case first (torch's default, `foreach=True`, "
        "`fused=True`, `torch.compile`-d `step`; for BatchNorm also `torch-prealloc`), then against torch's "
        "default.",
        "- BatchNorm: fastnorm's large CPU outputs come from its buffer pool (warm pages); `torch` allocates fresh "
        "outputs (on CPU, large blocks come back from the OS as page faults each call); `torch-prealloc` runs "
        "torch's own kernels (`aten::native_batch_norm(_backward).out`, no autograd) into outputs allocated once, "
        "and `numba-kernels` fastnorm's numba kernels the same way (address entry points, no autograd, no Python "
        "module): compare `numba` with `torch` for the modules users call, `numba-kernels` with `torch-prealloc` "
        "for the kernels alone. The gap between `numba` and `numba-kernels` is fastnorm's layer "
        "(the Python module, the dispatch of `torch.ops.fastnorm.batch_norm` and its checks, autograd, "
        "buffer pool; bench/results/bn_profile.md measures it).",
    ]
    if roof:
        lines.append(
            f"- roofline: {roof['gbps']:.1f} GB/s ({roof['case']} by {roof['provider']}; "
            + ", ".join(f"{r['provider']} {r['gbps']:.1f}" for r in records if r["op"] == "roofline")
            + " GB/s), measured in this run as a reference, not a ceiling: the machine's bandwidth drifts "
            "between the minutes of a run, and kernels with more concurrent streams (an optimizer reads and "
            "writes three or four arrays) can exceed a two-array update"
        )
    lines.append("")
    for op in sorted(table, key=lambda op: (op not in MODE_OPS, op)):  # whole steps first
        lines += [f"## {op}", ""]
        if op in MODE_OPS:
            lines += [MODE_NOTE, ""]
        has_bytes = any(r.get("bytes") for cs in table[op].values() for r in cs)
        has_modes = op in MODE_OPS
        head = "| case | provider | median (IQR) | vs best torch [95% CI] |"
        sep = "|---|---|---:|---:|"
        if has_modes:
            head += " vs best torch of its mode [95% CI] |"
            sep += "---:|"
        head += " vs torch default |"
        sep += "---:|"
        if has_bytes:
            head += " GB/s | % roofline |"
            sep += "---:|---:|"
        if has_modes:
            head += " peak memory | first call |"
            sep += "---:|---:|"
        lines += [head, sep]
        for case in _sorted_cases(table[op]):
            for r in table[op][case]:
                name = f"**{r['provider']}**" if r["provider"] == r.get("best_torch") else r["provider"]
                default = "—" if r["vs_torch_default"] is None else f"{r['vs_torch_default']:.2f}x"
                row = f"| {case} | {name} | {_fmt_spread(r)} | {_fmt_ratio(r['vs_best_torch'])} |"
                if has_modes:
                    row += f" {_fmt_ratio(r.get('vs_best_torch_same_mode'))} |"
                row += f" {default} |"
                if has_bytes:
                    pct = f"{100 * r['gbps'] / roof['gbps']:.0f}%" if roof and r.get("gbps") else "—"
                    row += f" {r.get('gbps', 0):.1f} | {pct} |"
                if has_modes:
                    row += f" {_fmt_bytes(r.get('peak_bytes'))} | {_fmt_time(r['first_call_s'])} |"
                lines.append(row)
        lines.append("")
    compiled = [
        r
        for r in records
        if "compile_s" in r
        and (r["provider"] in ("numba", "cuda", "torch-compiled") or mode_of(r["provider"]) is not None)
    ]
    if compiled:
        lines += ["## First call (compilation or on-disk cache load) minus steady state", "",
                  "| op | case | provider | first call - median |", "|---|---|---|---:|"]  # fmt: skip
        for r in sorted(compiled, key=lambda r: -r["compile_s"])[:20]:
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {_fmt_time(r['compile_s'])} |")
        lines.append("")
    if report["skipped"]:
        lines += ["## Skipped providers and cases", "", "| reason | count |", "|---|---:|"]
        by_reason: dict = defaultdict(int)
        for reason in report["skipped"].values():
            by_reason[reason] += 1
        for reason, count in sorted(by_reason.items()):
            lines.append(f"| {reason} | {count} |")
        lines.append("")
    return "\n".join(lines)


def chart(report: dict, path: Path, title: str, table: dict | None = None) -> None:
    """Per op, grouped bars by case: every provider's speedup over the best torch provider (log
    scale, bootstrap 95% error bars); and a roofline panel: achieved GB/s of the fastest
    fastnorm and the fastest torch provider per case against the measured bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    table = table or rows_by_case(report["records"])
    ops = [op for op in CHART_OPS if op in table] or sorted(table)[:9]
    roof = roofline(report["records"])
    panels = len(ops) + (1 if roof else 0)
    cols = 2
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.6 * rows + 0.8), squeeze=False, layout="constrained")
    providers = sorted({r["provider"] for op in ops for cs in table[op].values() for r in cs})
    cmap = plt.get_cmap("tab20")
    colors = {p: cmap(i % 20) for i, p in enumerate(providers)}
    for ax, op in zip(axes.flat, ops):
        cases = _sorted_cases(table[op])
        names = sorted({r["provider"] for c in cases for r in table[op][c]})
        width = 0.8 / max(len(names), 1)
        for k, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                r = next((r for r in table[op][case] if r["provider"] == name), None)
                if r is None or r["vs_best_torch"] is None:
                    continue
                rt = r["vs_best_torch"]
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(rt.value)
                lo.append(rt.value - rt.low)
                hi.append(rt.high - rt.value)
            ax.bar(xs, ys, width, yerr=[lo, hi], color=colors[name], label=name, error_kw={"lw": 0.7})
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if str(v)[0] in "2358" else ""))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(cases)), cases, fontsize=7, rotation=15)
        ax.set_title(op, fontsize=9)
        ax.set_ylabel("speedup vs best torch", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(names) < 10 else 3, loc="best")
    if roof:
        ax = axes.flat[len(ops)]
        labels, fast_nf, fast_t = [], [], []
        for op in sorted(table):
            for case in _sorted_cases(table[op]):
                rs = [r for r in table[op][case] if r.get("gbps")]
                nf = [r for r in rs if not _is_torch(r["provider"]) and r["provider"] != "reference"]
                tt = [r for r in rs if _is_torch(r["provider"])]
                if nf and tt and (op.startswith("batchnorm_forward_backward") or op.startswith("optim_")):
                    labels.append(f"{op.replace('batchnorm_', 'bn_').replace('optim_', '')} {case}")
                    fast_nf.append(max(r["gbps"] for r in nf))
                    fast_t.append(max(r["gbps"] for r in tt))
        ys = range(len(labels))
        ax.barh([y - 0.2 for y in ys], fast_nf, 0.4, label="fastest fastnorm", color="tab:blue")
        ax.barh([y + 0.2 for y in ys], fast_t, 0.4, label="fastest torch", color="tab:orange")
        ax.axvline(roof["gbps"], color="black", ls="--", lw=1, label=f"roofline {roof['gbps']:.0f} GB/s")
        ax.set_yticks(list(ys), labels, fontsize=5)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s of the minimal algorithm's bytes", fontsize=8)
        ax.set_title("roofline: achieved bandwidth vs the measured in-place bandwidth", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(title + " — providers interleaved per round; error bars: bootstrap 95% intervals", fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(json_path: Path, title: str | None = None) -> tuple[Path, Path]:
    json_path = Path(json_path)
    report = load(json_path)
    title = title or f"fastnorm benchmark: {json_path.stem}"
    table = rows_by_case(report["records"])
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(markdown(report, title, table) + f"\n![chart]({png_path.name})\n")
    chart(report, png_path, title, table)
    return md_path, png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="the JSON of a bench run (--benchmark-json)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    md, png = write(args.json, args.title)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
