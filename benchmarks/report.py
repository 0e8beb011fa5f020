"""Benchmark results: JSON (merged per device, by op), a markdown table and a PNG chart."""
from __future__ import annotations

import json
import os
import re


def device_tag(meta: dict) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-")
    return f"{meta['device_type']}-{name}"


def merge(path: str, meta: dict, rows: list[dict]) -> dict:
    """Results of this run replace earlier ones of the same ops; other ops' rows are kept."""
    ops = {r["op"] for r in rows}
    old_rows = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old_rows = [r for r in old.get("rows", []) if r["op"] not in ops]
        if old_rows:  # every command whose rows the file still holds, oldest first
            earlier = old["meta"].get("commands", [old["meta"]["command"]])
            meta = {**meta, "commands": [c for c in earlier if c != meta["command"]]
                    + [meta["command"]]}
    return {"meta": meta, "rows": old_rows + rows}


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _images(row: dict) -> str:
    if row.get("images_per_s") is None:
        return ""
    return f"{row['images_per_s']:.0f} / {row['native_images_per_s']:.0f}"


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [
        f"# dlext benchmarks: {m['device_name']} ({m['device_type']})",
        "",
        f"- torch {m['torch']}, dlext {m['dlext']}, {m['threads']} CPU threads, {m['date']}",
        f"- measured copy bandwidth: {m['copy_gbps']:.1f} GB/s"
        + "".join(f"; {k} matmul: {v:.2f} TFLOP/s" for k, v in m.get("matmul_tflops", {}).items()),
        "- reproduce: " + "; then ".join(f"`{c}`" for c in m.get("commands", [m["command"]])),
        "- speedup = native time / dlext time, both medians of interleaved runs in this run;"
        " % roof = achieved GB/s of the copy bandwidth (memory-bound) or TFLOP/s of the matmul rate;"
        " images/s for end-to-end training steps (dlext / native)",
        "",
        "| op | case | mode | dlext ms | native ms | speedup | target | GB/s | TFLOP/s | % roof"
        " | images/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        target = "" if r["target"] is None else f"≥{r['target']:.2f}x " + ("✓" if r["meets_target"] else "✗")
        lines.append(
            f"| {r['op']} | {r['label']} | {r['mode']} | {r['dlext_ms']:.3f} | {r['native_ms']:.3f}"
            f" | {r['speedup']:.2f}x | {target} | {_fmt(r['gbps'], '.1f')} | {_fmt(r['tflops'], '.2f')}"
            f" | {_fmt(r['pct_roof'], '.0f')} | {_images(r)} |")
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    labels = [f"{r['op']} {r['label']} {r['mode']}" for r in rows]
    speed = [r["speedup"] for r in rows]
    colors = ["#999999" if r["target"] is None else ("#2a9d3f" if r["meets_target"] else "#d1495b")
              for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), speed, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over native (higher is better); green/red: meets/misses the issue's target")
    ax.set_title(f"dlext vs native: {doc['meta']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: str, meta: dict, rows: list[dict]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, device_tag(meta))
    doc = merge(base + ".json", meta, rows)
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(doc))
    chart(doc, base + ".png")
    return base
