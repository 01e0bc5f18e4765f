"""Time gradguard's per-step overhead against torch and peer packages; write the docs page.

Runs :func:`overhead_bench.run_overhead` with the full settings (the 9M-parameter
GPT-like model, the 500-layer MLP, a history of 100,000 norms), prints the tables and
rewrites ``docs/performance.md``. Takes about two minutes on a quiet 2-core CPU.

Usage, from a checkout: ``make bench`` or
``python benchmarks/overhead.py [--rounds N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import overhead_bench as bench

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
ROUNDS = 50


def main() -> None:
    parser = argparse.ArgumentParser(description="Time gradguard's per-step overhead.")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"default {ROUNDS}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=DOC, help=f"default {DOC}")
    args = parser.parse_args()
    result = bench.run_overhead(rounds=args.rounds, threads=args.threads)
    bench.print_result(result)
    args.out.write_text(bench.report_markdown(result), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
