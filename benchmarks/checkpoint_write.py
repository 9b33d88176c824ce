"""Time the synchronous, atomic write of a checkpoint (what a GPU would wait for at an epoch's
end without ``checkpoint.async_write``): five writes of a run's ``last.ckpt`` beside it.

    python benchmarks/checkpoint_write.py <run folder or last.ckpt> [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ivreg.callbacks import atomic_write
from ivreg.checkpoints import read_checkpoint, resolve_path


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    source = resolve_path(args.checkpoint)
    ckpt = read_checkpoint(source)
    out = source.with_name("checkpoint_write_benchmark.ckpt")
    times = []
    try:
        for _ in range(args.repeats):
            start = time.perf_counter()
            atomic_write(out, lambda f: torch.save(ckpt, f), binary=True)
            times.append(time.perf_counter() - start)
        size = out.stat().st_size / 2**20
    finally:
        out.unlink(missing_ok=True)
    print(f"{source}: {size:.0f} MiB written in " + ", ".join(f"{t:.2f}" for t in times) + " s")
    return times


if __name__ == "__main__":
    main()
