"""Run the benchmarks: validate each case against native, then time both (see timing.py)."""
from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

import dlext
from benchmarks import report
from benchmarks.cases import MODULES
from benchmarks.roofline import copy_bandwidth, matmul_rate
from benchmarks.timing import Rotator, compare


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def validate(case, inputs) -> None:
    ours, theirs = _as_tuple(case.dlext(*inputs)), _as_tuple(case.native(*inputs))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=case.rtol, atol=case.atol, equal_nan=True)


def _input_bytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def run_case(case, device, meta, budget) -> dict:
    rot = Rotator(case.make_inputs, _input_bytes(case.make_inputs()), device)
    validate(case, rot.sets[0])
    t = compare({"dlext": lambda: case.dlext(*rot.next()),
                 "native": lambda: case.native(*rot.next())}, device, budget_s=budget)
    speedup = t["native"] / t["dlext"]
    row = {"op": case.op, "label": case.label, "mode": case.mode, "dlext_ms": t["dlext"] * 1e3,
           "native_ms": t["native"] * 1e3, "speedup": speedup, "target": case.target,
           "meets_target": None if case.target is None else speedup >= case.target,
           "gbps": None, "tflops": None, "pct_roof": None}
    if case.extra.get("images"):
        row["images_per_s"] = case.extra["images"] / t["dlext"]
        row["native_images_per_s"] = case.extra["images"] / t["native"]
    if case.bytes_moved:
        row["gbps"] = case.bytes_moved / t["dlext"] / 1e9
        if case.roofline == "copy":
            row["pct_roof"] = 100 * row["gbps"] / meta["copy_gbps"]
    if case.flops:
        row["tflops"] = case.flops / t["dlext"] / 1e12
        rate = meta["matmul_tflops"].get(case.roofline)
        if rate:
            row["pct_roof"] = 100 * row["tflops"] / rate
    return row


def device_meta(device: torch.device, quick: bool, command: str) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
        name = f"{name} {torch.get_num_threads()} threads"
    return {"device_type": device.type, "device_name": name, "torch": torch.__version__,
            "dlext": dlext.__version__, "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "command": command,
            "copy_gbps": copy_bandwidth(device, quick) / 1e9, "matmul_tflops": {}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "all"],
                   help="auto: CUDA if available, else CPU")
    p.add_argument("--ops", default=",".join(MODULES), help=f"comma list of {list(MODULES)}")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing (smoke test)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON, markdown, PNG")
    args = p.parse_args(argv)
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])

    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "auto":
        devices = ["cuda" if torch.cuda.is_available() else "cpu"]
    else:
        devices = [args.device]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in MODULES]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(MODULES)}")
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)

    for dev_name in devices:
        device = torch.device(dev_name)
        if device.type == "cuda" and not dlext.build_info()["with_cuda"]:
            print("dlext was built without CUDA kernels; skipping cuda", file=sys.stderr)
            continue
        meta = device_meta(device, args.quick, command)
        print(f"== {meta['device_name']}: copy bandwidth {meta['copy_gbps']:.1f} GB/s", flush=True)
        rows = []
        for op in ops:
            for case in MODULES[op].cases(device, args.quick):
                if case.flops and case.roofline not in meta["matmul_tflops"]:
                    dtype = getattr(torch, case.roofline)
                    meta["matmul_tflops"][case.roofline] = matmul_rate(device, dtype, args.quick) / 1e12
                row = run_case(case, device, meta, budget)
                rows.append(row)
                print(f"{row['op']:>14} {row['label']:<32} {row['mode']:<8} dlext {row['dlext_ms']:9.3f} ms"
                      f"  native {row['native_ms']:9.3f} ms  x{row['speedup']:.2f}"
                      + (f"  {row['pct_roof']:.0f}% roof" if row["pct_roof"] is not None else "")
                      + (f"  {row['images_per_s']:.0f} vs {row['native_images_per_s']:.0f} images/s"
                         if row.get("images_per_s") else ""),
                      flush=True)
        base = report.write(args.out, meta, rows)
        print(f"wrote {base}.json, .md, .png")
    return 0
