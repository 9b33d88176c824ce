"""Where a profiled training step leaves the GPU idle: reads a Chrome trace written by
``torch.profiler`` (``benchmarks/throughput.py --section steps --profile --trace-dir DIR``)
and prints

* the GPU's busy share of the profiled span (union of kernel, memcpy and memset times),
* kernel launches per top-level CPU op (the outermost op of the launching thread, e.g.
  ``aten::conv2d`` or ``autograd::engine::evaluate_function: ConvolutionBackward0``), which
  says where a launch-bound step spends its host time,
* the longest idle gaps, each with the top-level CPU ops that ran during it.

    python benchmarks/trace_gaps.py /tmp/traces/trace_byol.json [--steps 20] [--gaps 10]

A benchmark helper, not a test; it reads plain or gzipped JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_OP_CATEGORIES = {"cpu_op"}
# cudaLaunchKernel and friends; Triton kernels are launched through the driver (cuLaunchKernel)
LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}


@dataclass
class TraceSummary:
    span_us: float
    busy_us: float
    launches: Counter = field(default_factory=Counter)
    gaps: list[tuple[float, float, list[str]]] = field(default_factory=list)  # (start, length, CPU ops)

    @property
    def busy_share(self) -> float:
        return self.busy_us / self.span_us if self.span_us > 0 else float("nan")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of [start, end) intervals, sorted and disjoint."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def top_level_ops(events: Sequence[dict]) -> list[dict]:
    """CPU ops not nested in another CPU op of the same thread."""
    ops = sorted(
        (e for e in events if e.get("cat") in CPU_OP_CATEGORIES),
        key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e["dur"]),
    )
    top, end_of = [], {}
    for e in ops:
        thread = (e.get("pid"), e.get("tid"))
        if thread in end_of and e["ts"] + e["dur"] <= end_of[thread]:
            continue
        top.append(e)
        end_of[thread] = e["ts"] + e["dur"]
    return top


def enclosing(op_starts: list[float], ops: list[dict], t: float) -> dict | None:
    """The op of ``ops`` (sorted by start, disjoint) that contains time ``t``."""
    lo, hi = 0, len(ops)
    while lo < hi:
        mid = (lo + hi) // 2
        if op_starts[mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        return None
    op = ops[lo - 1]
    return op if t <= op["ts"] + op["dur"] else None


def summarize(events: Sequence[dict], num_gaps: int = 10) -> TraceSummary:
    gpu = merge_intervals((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES)
    if not gpu:
        raise ValueError("the trace holds no GPU kernels (was it profiled on a CUDA device?)")
    span = gpu[-1][1] - gpu[0][0]
    busy = sum(end - start for start, end in gpu)
    top = top_level_ops(events)
    by_thread: dict[tuple, list[dict]] = {}
    for op in top:
        by_thread.setdefault((op.get("pid"), op.get("tid")), []).append(op)
    starts = {k: [op["ts"] for op in v] for k, v in by_thread.items()}
    launches: Counter = Counter()
    for e in events:
        if e.get("cat") in LAUNCH_CATEGORIES and "Launch" in e.get("name", ""):
            thread = (e.get("pid"), e.get("tid"))
            op = enclosing(starts.get(thread, []), by_thread.get(thread, []), e["ts"])
            launches[op["name"] if op else "(outside any op)"] += 1
    gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in zip(gpu, gpu[1:])), reverse=True)[:num_gaps]
    described = []
    for length, start, end in gaps:
        names = Counter(op["name"] for op in top if op["ts"] < end and op["ts"] + op["dur"] > start)
        described.append((start - gpu[0][0], length, [f"{n} x{k}" if k > 1 else n for n, k in names.most_common(4)]))
    return TraceSummary(span_us=span, busy_us=busy, launches=launches, gaps=described)


def report(summary: TraceSummary, steps: int | None = None, top: int = 15) -> str:
    per = f" per step ({steps} steps)" if steps else ""
    div = steps or 1
    lines = [
        f"GPU busy {summary.busy_us / 1e3:.1f} ms of {summary.span_us / 1e3:.1f} ms ({100 * summary.busy_share:.0f}%)"
        + (f"; per step {summary.busy_us / 1e3 / div:.2f} of {summary.span_us / 1e3 / div:.2f} ms" if steps else ""),
        f"kernel launches{per} by top-level CPU op ({sum(summary.launches.values()) / div:.1f} in all):",
    ]
    lines += [f"  {count / div:8.1f}  {name}" for name, count in summary.launches.most_common(top)]
    lines.append("longest GPU idle gaps (ms after the first kernel, length, CPU ops meanwhile):")
    lines += [f"  {start / 1e3:9.2f}  {length / 1e3:7.3f} ms  {'; '.join(ops)}" for start, length, ops in summary.gaps]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", type=Path, help="Chrome trace files (.json or .json.gz)")
    p.add_argument("--steps", type=int, default=None, help="profiled steps in each trace, for per-step figures")
    p.add_argument("--gaps", type=int, default=10, help="how many of the longest idle gaps to list")
    args = p.parse_args(argv)
    for path in args.traces:
        print(f"== {path.name}")
        try:
            print(report(summarize(load_events(path), args.gaps), args.steps))
        except (OSError, ValueError, KeyError) as exc:  # unreadable, not JSON, or no kernels
            raise SystemExit(f"error: {path}: {exc}") from exc


if __name__ == "__main__":
    main()
