"""Command line: python -m dlext info | train | gradcheck | bench."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled backends, devices and registered ops")
    p = sub.add_parser("gradcheck", help="check every op against native torch and by gradcheck")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    from dlext.train import parser as train_parser
    train_parser(sub.add_parser("train", help="train a model on real data (see dlext/train.py)"))
    p = sub.add_parser("bench", help="kernel benchmarks vs native (see benchmarks/)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for benchmarks.run")
    # bench hands its options (--device, --ops, ...) to benchmarks.run, which checks them.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "info":
        from dlext.info import report
        print(report())
        return 0
    if args.command == "train":
        from dlext.train import main as train_main
        return train_main(args)
    if args.command == "gradcheck":
        from dlext.selfcheck import run
        return run(args.device)
    if args.command == "bench":
        try:
            from benchmarks.run import main as bench_main
        except ImportError:
            print("the benchmarks live in the source checkout: run this from its root",
                  file=sys.stderr)
            return 2
        return bench_main(extra + args.args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
