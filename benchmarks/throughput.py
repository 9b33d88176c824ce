"""Throughput benchmarks, one section per question, all run on the same machine in one go.

    python benchmarks/throughput.py --section aug [--device cpu|cuda] [--n-images N] [--batch-size B]

Sections (``--section all`` runs every registered one):

* ``aug``: augmented views per second of (a) the per-image torchvision pipeline
  (``build_view_transform``) in DataLoader workers and (b) the batched pipeline
  (``ivreg.data.batched_aug``) on ``--device``, over the same synthetic in-memory
  CIFAR-sized uint8 dataset with the CIFAR asymmetric two-view config.
* ``hybrid``: views per second of the two pipelines for datasets kept on disk (ImageNet-sized
  JPEGs, 224 px views): every op per image in DataLoader workers, against workers that only
  decode, crop and flip while the colour ops run batched on ``--device``.
* ``steps``: training steps per second of every method (the shipped CIFAR configs, full
  Lightning step with the device-resident pipeline: augmentation, forward, loss,
  backward, optimizer, EMA), and the peak device memory of each.

    python benchmarks/throughput.py --section steps --device cuda                 # ResNet-18, batch 256
    python benchmarks/throughput.py --section steps --device cpu --backbone resnet10 --step-batch 32
    python benchmarks/throughput.py --section steps --device cuda --methods byol --steps 20 --profile

* ``census``: the ATen ops a step dispatches, by phase (about one kernel launch each on a GPU).
* ``eigh``: the decomposition of a 256x256 correlation matrix, by method and device.
* ``lars``: milliseconds per LARS update with the trust ratios per tensor and gathered.

To add a section, write ``run_<name>(args) -> dict`` and register it in ``SECTIONS``; add
its options to ``build_parser``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ivreg.config import COMPILE_MODES, COMPILE_SCOPES  # noqa: E402
from ivreg.data.augment import ViewSpec, build_view_transform, load_view_specs  # noqa: E402
from ivreg.data.batched_aug import build_batched_views  # noqa: E402
from ivreg.optim import LARS  # noqa: E402
from ivreg.predictors import time_decompose  # noqa: E402
from ivreg.timing import synchronize, time_runs  # noqa: E402

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


CIFAR_AUGMENTATIONS = Path(__file__).resolve().parents[1] / "scripts/pretrain/cifar/augmentations/asymmetric.yaml"


def synthetic_images(n_images: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """In-memory uint8 (N, 3, size, size) images; content does not affect the speed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8, generator=generator)


class _PerImageViews(Dataset):
    """The list of views of one image, as the training loader makes them (labels dropped):
    ``images`` is a uint8 tensor of images or a dataset of ``(image, label)``."""

    def __init__(self, images: torch.Tensor | Dataset, transforms: Sequence[Callable[[Any], torch.Tensor]]):
        self.images = images
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = self.images[index]
        if isinstance(image, tuple):
            image = image[0]
        return [t(image) for t in self.transforms]


def _time_per_image(
    images: torch.Tensor,
    specs: Sequence[ViewSpec],
    batch_size: int,
    workers: int,
    repeats: int,
    dev: torch.device,
) -> list[float]:
    """Seconds per epoch of the per-image pipeline; the workers stop when this returns."""
    transforms = [build_view_transform(spec, CIFAR10_MEAN, CIFAR10_STD) for spec in specs]
    return _time_loader(_PerImageViews(images, transforms), batch_size, workers, repeats, dev)


def _time_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    repeats: int,
    dev: torch.device,
    on_device: Callable[[list[torch.Tensor]], object] | None = None,
) -> list[float]:
    """Seconds per epoch of a DataLoader of ``dataset`` (items: lists of views), each batch's
    views moved to ``dev`` and, if given, passed to ``on_device``; after one warm-up epoch
    (which starts the persistent workers, and compiles what ``on_device`` compiles)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=dev.type == "cuda",
    )

    def epoch() -> None:
        for batch in loader:
            views = [v.to(dev, non_blocking=True) for v in batch]
            if on_device is not None:
                on_device(views)

    epoch()
    return time_runs(epoch, repeats, dev)


def bench_augmentation(
    n_images: int = 4096,
    batch_size: int = 512,
    device: str = "cpu",
    workers: int = 2,
    threads: int | None = None,
    repeats: int = 3,
    compiled: bool = True,
) -> dict[str, Any]:
    """Views per second of the per-image and the batched pipeline on the same data.

    Both pipelines make the two CIFAR views of every image ``repeats`` times after one
    warm-up pass (which starts the persistent workers). The per-image views are moved to
    ``device`` as training would; the batched pipeline reads a dataset already on
    ``device``. ``threads`` (default: ``workers``) bounds the intra-op threads of the
    batched pipeline on CPU so that both sides use the same number of cores.
    With ``compiled`` the batched pipeline is timed a second time with its ops through
    ``torch.compile`` (``compile_ops``; the compilation happens in the warm-up pass).
    Returns views/s per run (median and best) for each, and the ratios of the medians.
    """
    dev = torch.device(device)
    specs = load_view_specs(CIFAR_AUGMENTATIONS)
    images = synthetic_images(n_images)
    n_views = len(specs) * n_images

    per_image = _time_per_image(images, specs, batch_size, workers, repeats, dev)

    on_device = images.to(dev)
    previous_threads = torch.get_num_threads()
    threads = workers if threads is None else threads
    if dev.type == "cpu":
        torch.set_num_threads(max(1, threads))
    batched_runs: dict[str, list[float]] = {}
    try:
        for label in ("batched", "compiled") if compiled else ("batched",):
            batched = build_batched_views(specs, CIFAR10_MEAN, CIFAR10_STD).to(dev)
            if label == "compiled":
                batched.compile_ops()
            generator = torch.Generator(device=dev).manual_seed(0)

            def batched_epoch() -> None:
                for start in range(0, n_images, batch_size):
                    batched(on_device[start : start + batch_size], generator=generator)  # noqa: B023

            # warm-up (and compilation)
            (warmup_s,) = time_runs(lambda: batched(on_device[:batch_size], generator=generator), 1, dev)  # noqa: B023
            batched_runs[label] = time_runs(batched_epoch, repeats, dev)
            if label == "compiled":
                compile_s = warmup_s
                if not all(view.compiled for view in batched.views):
                    print("  (torch.compile failed; the 'compiled' row ran the eager ops)")
    finally:
        torch.set_num_threads(previous_threads)

    def rates(seconds: list[float]) -> dict[str, float]:
        per_second = [n_views / s for s in seconds]
        return {"median": statistics.median(per_second), "best": max(per_second), "runs": per_second}

    result = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "n_images": n_images,
        "batch_size": batch_size,
        "views_per_image": len(specs),
        "workers": workers,
        "threads": threads if dev.type == "cpu" else None,
        "per_image": rates(per_image),
    }
    for label, runs in batched_runs.items():
        result[label] = rates(runs)
        result[f"speedup_{label}"] = result[label]["median"] / result["per_image"]["median"]
    result["speedup"] = result["speedup_batched"]
    if compiled:
        result["compile_s"] = compile_s
    return result


def _workers(args: argparse.Namespace) -> int:
    """``--workers``; by default 2 on the CPU (this project's machines have 2 cores), up to 12 with a GPU."""
    return args.workers if args.workers is not None else (2 if args.device == "cpu" else min(12, os.cpu_count() or 1))


def run_aug(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    n_images = args.n_images or (4096 if device == "cpu" else 65536)
    batch_size = args.batch_size or 512
    workers = _workers(args)
    result = bench_augmentation(
        n_images, batch_size, device, workers, args.threads, args.repeats, compiled=not args.no_compile
    )
    cores = f"{result['threads']} threads" if result["threads"] else result["device_name"]
    print(
        f"[aug] {result['device_name']}: {n_images} synthetic 32x32 uint8 images, CIFAR asymmetric config "
        f"({result['views_per_image']} views), batch {batch_size}, {args.repeats} timed epochs"
    )
    if device == "cpu" and hasattr(os, "getloadavg"):
        # Intra-op threads stall on a shared, oversubscribed machine; this helps read the numbers.
        print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end of the run)")
    rows = [
        (f"per-image torchvision, DataLoader with {workers} workers", "per_image"),
        (f"batched on {device} ({cores}), eager", "batched"),
    ]
    if "compiled" in result:
        rows.append((f"batched on {device} ({cores}), torch.compile", "compiled"))
    for label, key in rows:
        r = result[key]
        speedup = f"  {result['speedup_' + key]:.1f}x" if key != "per_image" else ""
        print(f"  {label:<58} {r['median']:>11,.0f} views/s (median; best {r['best']:,.0f}){speedup}")
    if "compile_s" in result:
        print(f"  (compilation took {result['compile_s']:.1f} s, once per run)")
    print("  speed-up = batched / per-image, medians")
    return result


IMAGENET_AUGMENTATIONS = Path(__file__).resolve().parents[1] / "scripts/pretrain/imagenet/augmentations/asymmetric.yaml"


def synthetic_jpeg_folder(root: Path, n_images: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """An ImageFolder (two classes) of ``n_images`` JPEGs (quality 90) of ImageNet's most common
    size, with smooth random content: decoding cost grows with the pixels and with the detail."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for i in range(n_images):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = torch.randint(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=torch.uint8, generator=generator)
        image = Image.fromarray(coarse.numpy()).resize(size, Image.Resampling.BICUBIC)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def bench_hybrid(
    n_images: int = 512, batch_size: int = 64, device: str = "cpu", workers: int = 2, repeats: int = 2
) -> dict[str, Any]:
    """Views per second of the two pipelines for datasets that do not fit on the device (ImageNet
    JPEGs of 500x375, the ImageNet asymmetric config, 224 px crops): ``workers``, every op per
    image in DataLoader workers, against ``hybrid``, the workers only decoding, cropping and
    flipping while the colour ops, blur and solarization run batched on ``device`` (end to end,
    as training runs it: compiled on a GPU), and the workers' half of ``hybrid`` on its own."""
    import tempfile

    from ivreg.data.augment import build_geometric_transform
    from ivreg.data.datasets import IMAGENET_MEAN, IMAGENET_STD, image_folder

    dev = torch.device(device)
    specs = load_view_specs(IMAGENET_AUGMENTATIONS)
    n_views = len(specs) * n_images
    batched = build_batched_views(specs, IMAGENET_MEAN, IMAGENET_STD).to(dev)
    if dev.type == "cuda":  # as training does it there (performance.compile_augmentation=auto)
        batched.compile_ops()
    generator = torch.Generator(device=dev).manual_seed(0)

    def colour_ops(crops: list[torch.Tensor]) -> None:  # the hybrid pipeline's device half
        for view, crop in zip(batched.views, crops):
            view(crop, generator=generator, geometric=False)

    with tempfile.TemporaryDirectory() as tmp:
        folder = image_folder(synthetic_jpeg_folder(Path(tmp), n_images), "train_path")
        full = [build_view_transform(spec, IMAGENET_MEAN, IMAGENET_STD) for spec in specs]
        geometric = [build_geometric_transform(spec) for spec in specs]
        timed = {
            "workers": _time_loader(_PerImageViews(folder, full), batch_size, workers, repeats, dev),
            "hybrid": _time_loader(_PerImageViews(folder, geometric), batch_size, workers, repeats, dev, colour_ops),
            "hybrid_workers_half": _time_loader(_PerImageViews(folder, geometric), batch_size, workers, repeats, dev),
        }
    result: dict[str, Any] = {"n_images": n_images, "batch_size": batch_size, "workers": workers, "device": str(dev)}
    for label, seconds in timed.items():
        result[label] = n_views / statistics.median(seconds)
    result["speedup"] = result["hybrid"] / result["workers"]
    return result


def run_hybrid(args: argparse.Namespace) -> dict[str, Any]:
    workers = _workers(args)
    n_images = args.n_images or (512 if args.device == "cpu" else 4096)
    result = bench_hybrid(n_images, args.batch_size or 64, args.device, workers, args.repeats)
    print(
        f"[hybrid] {result['n_images']} synthetic 500x375 JPEGs, ImageNet asymmetric config (2 views of 224 px), "
        f"batch {result['batch_size']}, DataLoader with {workers} workers, colour ops on {result['device']}"
    )
    rows = [
        ("workers: every op per image in the workers", "workers"),
        ("hybrid: decode, crop, flip in the workers; colour ops batched", "hybrid"),
        ("  the workers' half of hybrid alone", "hybrid_workers_half"),
    ]
    for label, key in rows:
        print(f"  {label:<64} {result[key]:>9,.0f} views/s (median of {args.repeats})")
    print(f"  hybrid / workers: {result['speedup']:.1f}x")
    return result


STEP_METHODS = ("byol", "byol-noema", "directpred", "directpred-noema", "isoloss", "isoloss-noema")


class _SyntheticImages(Dataset):
    """Random uint8 CIFAR-sized images with labels; the device-resident pipeline reads
    ``images`` directly."""

    def __init__(self, n: int, size: int = 32, classes: int = 10):
        self.images = synthetic_images(n, size)
        self.targets = torch.arange(n) % classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


class _StepTimer:
    """Times the optimizer steps after ``warmup`` steps (one device sync at each end).

    With ``profile`` the timed steps also run under ``torch.profiler`` (the timings then include
    its overhead) and, on CUDA, under ``torch.cuda.set_sync_debug_mode("warn")`` so that every
    host-device synchronisation of the step is counted.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device, profile: bool = False):
        import lightning as L

        timer = self

        class Callback(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
                if batch_idx == warmup:
                    synchronize(device)
                    if profile:
                        timer.start_profiling()
                    timer.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
                if timer.start == 0.0:
                    return
                synchronize(device)
                timer.end = time.perf_counter()
                timer.steps = batch_idx + 1 - warmup
                if timer.steps == steps:  # the epoch-end work stays out of the profile
                    timer.stop_profiling()

            def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
                timer.stop_profiling()

        self.callback = Callback()
        self.device = device
        self.start = self.end = 0.0
        self.steps = 0
        self.profiler: torch.profiler.profile | None = None
        self._profiler_stopped = False
        self._warnings: Any = None
        self.sync_warnings: list[warnings.WarningMessage] = []

    def start_profiling(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._warnings = warnings.catch_warnings(record=True)
            self.sync_warnings = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.__enter__()

    def stop_profiling(self) -> None:
        if self.profiler is not None and not self._profiler_stopped:
            synchronize(self.device)
            self.profiler.__exit__(None, None, None)
            self._profiler_stopped = True
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            self._warnings = None

    def report(self, out_dir: Path | None, label: str) -> dict[str, float]:
        """Prints the top ops; returns launches (CUDA kernels, or aten ops on CPU) and host
        syncs per step; writes a Chrome trace to ``out_dir`` if given."""
        if self.profiler is None or self.steps == 0:
            return {}
        averages = self.profiler.key_averages()
        cuda = self.device.type == "cuda"
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(averages.table(sort_by=sort_by, row_limit=15))
        if cuda:
            launches = sum(e.count for e in averages if "LaunchKernel" in e.key)
        else:
            launches = sum(e.count for e in averages if e.key.startswith("aten::"))
        syncs = [w for w in self.sync_warnings if "synchroniz" in str(w.message)]
        if syncs:
            where: dict[str, int] = {}
            for w in syncs:
                key = f"{Path(w.filename).name}:{w.lineno}"
                where[key] = where.get(key, 0) + 1
            print("  host syncs by call site:", ", ".join(f"{k} x{v}" for k, v in sorted(where.items())))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(out_dir / f"trace_{label}.json"))
        return {
            "launches_per_step": launches / self.steps,
            "syncs_per_step": len(syncs) / self.steps if cuda else float("nan"),
        }


def build_step_run(
    method: str,
    device: str,
    batch_size: int,
    n_steps: int,
    backbone: str,
    precision: str,
    compile_aug: str = "auto",
    compile_model: bool = False,
    compile_mode: str = "default",
    compile_scope: str = "modules",
    batch_views: str = "auto",
    extra_overrides: Sequence[str] = (),
) -> Any:
    """One method's shipped CIFAR config as a one-epoch run of ``n_steps`` training steps on
    synthetic 32x32 images (device-resident pipeline, no validation, no files), with
    ``extra_overrides`` (Hydra syntax) applied last."""
    from ivreg.config import compose
    from ivreg.train import build_run

    root = Path(__file__).resolve().parents[1]
    overrides = [
        "data.dataset=digits",  # replaced below by synthetic 32x32 images
        "++data.pipeline=resident",
        f"backbone.name={backbone}",
        f"optimizer.batch_size={batch_size}",
        f"accelerator={'gpu' if torch.device(device).type == 'cuda' else 'cpu'}",
        "devices=1",
        f"precision={precision}",
        f"++performance.compile_augmentation={compile_aug}",
        f"++performance.compile={compile_model}",
        f"++performance.compile_mode={compile_mode}",
        f"++performance.compile_scope={compile_scope}",
        f"++performance.batch_views={batch_views}",
        "max_epochs=1",
        "scheduler.warmup_epochs=0",
        "checkpoint.enabled=False",
        "logger.csv=False",
        "logger.tensorboard=False",
        f"++limit_train_batches={n_steps}",
        "++limit_val_batches=0",
        "++num_sanity_val_steps=0",
        "++enable_model_summary=False",
        "name=throughput",
        *extra_overrides,
    ]
    run = build_run(compose(str(root / "scripts" / "pretrain" / "cifar"), f"{method}.yaml", overrides))
    run.datamodule.raw_train = _SyntheticImages(batch_size * n_steps)
    run.datamodule.raw_val = None
    for cb in run.trainer.callbacks:  # no per-epoch files or prints in a benchmark
        if type(cb).__name__ == "EpochSummary":
            run.trainer.callbacks.remove(cb)
            break
    return run


def bench_steps(
    method: str,
    device: str,
    batch_size: int,
    steps: int,
    warmup: int,
    backbone: str,
    precision: str,
    compile_aug: str = "auto",
    profile: bool = False,
    profile_dir: Path | None = None,
    compile_model: bool = False,
    compile_mode: str = "default",
    compile_scope: str = "modules",
    batch_views: str = "auto",
    extra_overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Steps/s and peak memory of one method's full training step (Lightning, resident data);
    with ``profile`` also kernel launches and host syncs per step."""
    dev = torch.device(device)
    run = build_step_run(
        method,
        device,
        batch_size,
        warmup + steps,
        backbone,
        precision,
        compile_aug,
        compile_model,
        compile_mode,
        compile_scope,
        batch_views,
        extra_overrides,
    )
    timer = _StepTimer(warmup, steps, dev, profile=profile)
    run.trainer.callbacks.append(timer.callback)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    from torch._dynamo.utils import counters

    before = (counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"])
    run.trainer.fit(run.model, datamodule=run.datamodule)
    seconds = timer.end - timer.start
    # graphs compiled in this run (the augmentation's included) and graphs that were to run as
    # CUDA graphs but did not (the reason is logged with TORCH_LOGS=cudagraphs)
    graphs = counters["stats"]["unique_graphs"] - before[0]
    cudagraph_skips = counters["inductor"]["cudagraph_skips"] - before[1]
    result = {
        "method": method,
        "precision": str(run.trainer.precision),
        "steps_per_s": timer.steps / seconds if seconds > 0 else float("nan"),
        "images_per_s": timer.steps * batch_size / seconds if seconds > 0 else float("nan"),
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "augmentation_compiled": bool(run.datamodule.compile_augmentation),
        "model_compiled": compile_model and f"{compile_scope}, {compile_mode}",
        "graphs": graphs,
        "cudagraph_skips": cudagraph_skips,
    }
    result.update(timer.report(profile_dir, method) if profile else {})
    return result


def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    cpu = args.device == "cpu"
    batch = args.step_batch or (32 if cpu else 256)
    steps = args.steps or (5 if cpu else 100)
    warmup = 2 if cpu else 20
    backbone = args.backbone or ("resnet10" if cpu else "resnet18")
    precision = args.precision or ("32" if cpu else "auto")
    profile = bool(args.profile)
    print(
        f"[steps] {args.device}: {backbone}, batch {batch}, {steps} timed steps after {warmup}, precision {precision}, "
        f"compile_augmentation={args.compile_aug}, compile={args.compile}"
        + (f" ({args.compile_scope}, mode {args.compile_mode})" if args.compile else "")
        + f", batch_views={args.batch_views}"
        + "".join(f", {o}" for o in args.override)
        + (" (profiled: timings include the profiler)" if profile else "")
    )
    results = {}
    for method in args.methods or STEP_METHODS:
        r = bench_steps(
            method,
            args.device,
            batch,
            steps,
            warmup,
            backbone,
            precision,
            args.compile_aug,
            profile,
            args.trace_dir,
            compile_model=args.compile,
            compile_mode=args.compile_mode,
            compile_scope=args.compile_scope,
            batch_views=args.batch_views,
            extra_overrides=args.override,
        )
        mem = f", peak memory {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else ""
        epoch = 50000 // batch / r["steps_per_s"]
        extra = ""
        if profile:
            kind = "kernel launches" if args.device == "cuda" else "aten ops"
            extra = f"  {r['launches_per_step']:.0f} {kind}/step"
            if args.device == "cuda":
                extra += f", {r['syncs_per_step']:.1f} host syncs/step"
        print(
            f"  {method:<18} {r['steps_per_s']:8.2f} steps/s  {r['images_per_s']:9.0f} images/s  "
            f"(a CIFAR-10 epoch: {epoch:6.1f} s){mem}  [{r['precision']}, aug compiled: "
            f"{r['augmentation_compiled']}, compiled: {r['model_compiled']}]{extra}"
            + (f"  graphs {r['graphs']}, CUDA-graph skips {r['cudagraph_skips']}" if r["model_compiled"] else ""),
            flush=True,
        )
        results[method] = r
    return results


def cuda_launches(name: str, args: Sequence[Any]) -> int:
    """1 for an op, but for a ``_foreach_*`` op whose tensor lists CUDA's multi-tensor route
    cannot take (tensors of different shapes or strides at one position, as a list of 0-dim
    factors against the parameters), one per tensor: CUDA then falls back to one kernel per
    tensor, where the CPU loops in any case."""
    if not name.startswith("_foreach_"):
        return 1
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
    if len(lists) < 2:
        return 1
    first = lists[0]
    same = all(
        t.shape == f.shape and t.stride() == f.stride() and t.dtype == f.dtype
        for other in lists[1:]
        for t, f in zip(other, first)
    )
    return 1 if same else len(first)


class _OpCensus:
    """Counts the ATen ops that eager PyTorch dispatches below autograd during the steps after
    ``warmup``, by the phase of the step that issued them. On a GPU each op that is neither a
    view nor an allocation is about one kernel launch, so the counts show where a step's
    launches, and the host time they cost, come from; on the CPU they are the same ops. A
    foreach op counts one launch per tensor where CUDA would fall back to that (``cuda_launches``).
    Regions that would run compiled (the augmentation on GPUs) count as their eager ops."""

    ALLOCATIONS = ("empty", "empty_strided", "empty_like")

    def __init__(self, model: Any, warmup: int, steps: int):
        import lightning as L
        from torch.utils._python_dispatch import TorchDispatchMode

        census = self
        self.phase = "data (augmentation) and loop"
        self.counts: dict[str, dict[str, int]] = {}
        self.op_names: dict[str, dict[str, int]] = {}  # phase -> op name -> count (ops only)
        self.steps = steps

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                name = func.overloadpacket.__name__
                kind = "views" if func.is_view else "allocations" if name in census.ALLOCATIONS else "ops"
                count = cuda_launches(name, args) if kind == "ops" else 1
                row = census.counts.setdefault(census.phase, {"ops": 0, "views": 0, "allocations": 0})
                row[kind] += count
                if kind == "ops":
                    names = census.op_names.setdefault(census.phase, {})
                    names[name] = names.get(name, 0) + count
                return func(*args, **(kwargs or {}))

        mode = Mode()

        def enter(phase: str) -> None:
            census.phase = phase

        class Phases(L.Callback):
            def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
                for optimizer in trainer.optimizers:  # LARS as on CUDA (its CPU path loops per tensor)
                    if isinstance(optimizer, LARS):
                        optimizer._gather = True

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
                if batch_idx == warmup:
                    mode.__enter__()
                enter("forward: loss, predictor, metrics")

            def on_before_backward(self, trainer, pl_module, loss) -> None:  # type: ignore[no-untyped-def]
                enter("backward")

            def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
                enter("optimizer step, EMA")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
                enter("data (augmentation) and loop")
                if batch_idx == warmup + steps - 1:
                    mode.__exit__(None, None, None)

        self.callback = Phases()
        modules = {
            "backbone": model.backbone,
            "projector": model.projector,
            "predictor": model.predictor,
            "readout": model.readout,
        }
        if model.target.has_copy:
            modules["EMA target"] = model.target.net
        for name, module in modules.items():
            self._label(module, f"forward: {name}")

    def _label(self, module: torch.nn.Module, phase: str) -> None:
        outer: list[str] = []

        def pre(mod, args) -> None:  # type: ignore[no-untyped-def]
            outer.append(self.phase)
            self.phase = phase

        def post(mod, args, out) -> None:  # type: ignore[no-untyped-def]
            self.phase = outer.pop()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def per_step(self) -> dict[str, dict[str, float]]:
        return {phase: {k: v / self.steps for k, v in row.items()} for phase, row in self.counts.items()}


def run_census(args: argparse.Namespace) -> dict[str, Any]:
    batch = args.step_batch or 8
    steps, warmup = args.steps or 3, 2
    backbone = args.backbone or "resnet18"
    print(
        f"[census] {args.device}: {backbone}, batch {batch}, {steps} steps after {warmup}: ATen ops dispatched per "
        "step (ops / views / allocations; on a GPU each op is about one kernel launch)"
    )
    results = {}
    for method in args.methods or STEP_METHODS:
        # all views in one pass, as on GPUs (--batch-views chooses otherwise)
        views = "True" if args.batch_views == "auto" else args.batch_views
        run = build_step_run(
            method, args.device, batch, warmup + steps, backbone, args.precision or "32", "False", batch_views=views
        )
        census = _OpCensus(run.model, warmup, steps)
        run.trainer.callbacks.append(census.callback)
        run.trainer.fit(run.model, datamodule=run.datamodule)
        rows = census.per_step()
        total = {k: sum(r[k] for r in rows.values()) for k in ("ops", "views", "allocations")}
        print(f"  {method:<18} {total['ops']:6.0f} / {total['views']:5.0f} / {total['allocations']:4.0f}", flush=True)
        for phase, r in sorted(rows.items(), key=lambda item: -item[1]["ops"]):
            print(f"    {phase:<36} {r['ops']:6.0f} / {r['views']:5.0f} / {r['allocations']:4.0f}")
            if args.census_ops:
                names = sorted(census.op_names.get(phase, {}).items(), key=lambda item: -item[1])
                print("      " + ", ".join(f"{name} {count / steps:g}" for name, count in names))
        results[method] = {"total": total, "phases": rows}
    return results


def correlation_matrix(dim: int, decay: float, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """A float32 correlation matrix ``Z^T Z / n`` of ``n`` projections whose spectrum falls as
    ``k ** -decay`` (``decay`` 0: flat, as IsoLoss keeps it; 2: steep, condition about
    ``dim ** 2``, as DirectPred's early spectra), in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    scales = torch.arange(1, dim + 1, dtype=torch.float64).pow(-decay / 2)
    z = torch.randn(n, dim, generator=gen, dtype=torch.float64) * scales @ basis.T
    return (z.T @ z / n).float()


def newton_schulz_sqrt(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """The square root of a symmetric positive semi-definite ``a`` from matrix products alone
    (coupled Newton-Schulz, scaled by the Frobenius norm so that it converges): a candidate
    for an eigendecomposition-free W_p, timed and checked here, not used by the library."""
    norm = torch.linalg.matrix_norm(a)
    eye = torch.eye(len(a), dtype=a.dtype, device=a.device)
    y, z = a / norm, eye
    for _ in range(iterations):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return y * norm.sqrt()


def bench_eigh(device: str, dim: int = 256, repeats: int = 50) -> dict[str, Any]:
    """Milliseconds per decomposition of a (dim, dim) correlation matrix, as the spectral
    predictor needs once per step, on ``device``: ``torch.linalg.eigh`` in float32 (the step's
    call) and float64, with MAGMA instead of cuSOLVER on CUDA, and the spectral predictor's
    ``decompose`` on the device and on the host (``method_kwargs.eigh_on_host``, copies
    included). Each call is timed to the end of its result (the step reads the decomposition
    after a host-side error check, so it waits for it too). Also the products-only alternative:
    W_p = (C / s_max)^(1/2) by Newton-Schulz (s_max from ``eigvalsh`` stands in for a power
    iteration) and its largest relative error against the eigh-built W_p."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    spectra = {"steep": correlation_matrix(dim, 2.0), "flat": correlation_matrix(dim, 0.0)}
    result: dict[str, Any] = {"device": str(dev), "dim": dim, "ms": {}, "newton_schulz": {}}

    def timed(label: str, run: Callable[[], Any]) -> None:
        run()  # warm-up: workspaces, libraries
        seconds = time_runs(run, repeats, dev)
        result["ms"][label] = 1000 * statistics.median(seconds)

    c32 = spectra["steep"].to(dev)
    c64 = c32.double()
    timed(f"eigh float32 ({dev.type})", lambda: torch.linalg.eigh(c32))
    timed(f"eigh float64 ({dev.type})", lambda: torch.linalg.eigh(c64))
    if cuda:
        library = torch.backends.cuda.preferred_linalg_library()
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            timed("eigh float32 (cuda, magma)", lambda: torch.linalg.eigh(c32))
        except RuntimeError as exc:  # a build without MAGMA
            print(f"  (no MAGMA: {str(exc).splitlines()[0]})")
        finally:
            torch.backends.cuda.preferred_linalg_library(library)

    # the spectral predictor's own call, on the device and with method_kwargs.eigh_on_host
    # (the timing that eigh_on_host=auto makes once, with more repeats)
    for on_host in (False, True):
        where = "host LAPACK + copies" if on_host else dev.type
        result["ms"][f"SpectralPredictor.decompose ({where})"] = 1000 * time_decompose(c32, on_host, repeats)

    def eigh_sqrt(c: torch.Tensor) -> torch.Tensor:
        s, u = torch.linalg.eigh(c)
        return (u * (s.clamp_min(0) / s.max()).sqrt()) @ u.T

    for name, c in spectra.items():
        for dtype in (torch.float32, torch.float64):
            c_dev = c.to(dev, dtype)
            scaled = c_dev / torch.linalg.eigvalsh(c_dev.double()).max().to(dtype)
            reference = eigh_sqrt(c.double()).to(dev)
            row = {}
            for iterations in (10, 20, 30):
                error = newton_schulz_sqrt(scaled, iterations).double().sub(reference).norm() / reference.norm()
                row[iterations] = float(error)
            result["newton_schulz"][f"{name}, {str(dtype).removeprefix('torch.')}"] = row
            if name == "steep":
                timed(
                    f"newton-schulz 30 iterations {str(dtype).removeprefix('torch.')} ({dev.type})",
                    lambda scaled=scaled: newton_schulz_sqrt(scaled, 30),
                )
    return result


def run_eigh(args: argparse.Namespace) -> dict[str, Any]:
    result = bench_eigh(args.device, repeats=args.eigh_repeats)
    print(f"[eigh] {result['device']}: decomposition of a {result['dim']}x{result['dim']} correlation matrix")
    for label, ms in result["ms"].items():
        print(f"  {label:<52} {ms:8.3f} ms")
    print("  W_p = (C / s_max)^(1/2) by Newton-Schulz, relative error against eigh after 10 / 20 / 30 iterations:")
    for label, errors in result["newton_schulz"].items():
        print(f"    {label:<20} " + " / ".join(f"{e:.1e}" for e in errors.values()))
    return result


def run_lars(args: argparse.Namespace) -> dict[str, Any]:
    """Milliseconds per LARS update of a backbone's parameters (``--backbone``, default
    ResNet-18, channels_last, random gradients) with the shipped BYOL options, for the trust
    ratios applied per tensor (``_foreach_mul_``, the CPU path) and gathered onto one flat
    buffer (the path off the CPU); the median of ``--repeats`` runs of ``--steps`` updates."""
    from ivreg.backbones import build_backbone

    device = torch.device(args.device)
    backbone = args.backbone or "resnet18"
    steps = args.steps or 10
    params = list(build_backbone(backbone, cifar_stem=True).to(device, memory_format=torch.channels_last).parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:  # (empty_like keeps each tensor's strides, as autograd's gradients do)
        p.grad = torch.empty_like(p).normal_(generator=gen)
    print(f"[lars] {device}: {backbone}, {len(params)} tensors, {sum(p.numel() for p in params):,} parameters")
    ms = {}
    for label, gather in (("per-tensor ratios (_foreach_mul_)", False), ("gathered ratios (one flat multiply)", True)):
        opt = LARS(params, lr=1.0, weight_decay=1e-5, eta=0.02, clip_lr=True, exclude_bias_n_norm=True)
        opt._gather = gather
        opt.step()  # builds the flat buffers

        def updates() -> None:
            for _ in range(steps):
                opt.step()  # noqa: B023 (called at once)

        ms[label] = 1e3 * statistics.median(time_runs(updates, args.repeats, device)) / steps
        print(f"  {label:<40} {ms[label]:8.2f} ms per update")
    return {"device": str(device), "backbone": backbone, "ms": ms}


# Register new sections here (name -> runner); "all" runs them in this order.
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "aug": run_aug,
    "steps": run_steps,
    "census": run_census,
    "eigh": run_eigh,
    "hybrid": run_hybrid,
    "lars": run_lars,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=[*SECTIONS, "all"], default="all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after a warm-up)")
    aug = parser.add_argument_group("aug and hybrid")
    aug.add_argument(
        "--n-images", type=int, default=None, help="default: 4096 on cpu, 65536 on cuda (hybrid: 512 and 4096)"
    )
    aug.add_argument("--batch-size", type=int, default=None, help="default: 512 (hybrid: 64)")
    aug.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: 2 on cpu, <= 12 on cuda")
    aug.add_argument("--threads", type=int, default=None, help="intra-op threads of the batched run on cpu")
    aug.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd batched run")
    steps = parser.add_argument_group("steps")
    steps.add_argument("--methods", nargs="*", choices=STEP_METHODS, default=None, help="default: all six")
    steps.add_argument("--step-batch", type=int, default=None, help="default: 32 on cpu, 256 on cuda")
    steps.add_argument("--steps", type=int, default=None, help="timed steps; default: 5 on cpu, 100 on cuda")
    steps.add_argument("--backbone", default=None, help="default: resnet10 on cpu, resnet18 on cuda")
    steps.add_argument("--precision", default=None, help="default: 32 on cpu, auto (bf16) on cuda")
    steps.add_argument(
        "--compile-aug", choices=["auto", "True", "False"], default="auto", help="performance.compile_augmentation"
    )
    steps.add_argument(
        "--compile", action="store_true", help="performance.compile=True (what it compiles: --compile-scope)"
    )
    steps.add_argument(
        "--compile-scope",
        default="modules",
        choices=COMPILE_SCOPES,
        help="performance.compile_scope: backbone and projector (modules) or the whole forward step (step)",
    )
    steps.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="performance.compile_mode (reduce-overhead: CUDA graphs)",
    )
    steps.add_argument(
        "--batch-views",
        choices=("auto", "True", "False"),
        default="auto",
        help="performance.batch_views: all views in one network pass (auto: on GPUs), or one pass per view",
    )
    steps.add_argument(
        "--profile", action="store_true", help="profile the timed steps: top ops, launches and host syncs per step"
    )
    steps.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override of the benchmarked config, e.g. ++method_kwargs.eigh_on_host=True (repeatable)",
    )
    steps.add_argument("--trace-dir", type=Path, default=None, help="with --profile: write Chrome traces here")
    census = parser.add_argument_group("census")
    census.add_argument("--census-ops", action="store_true", help="also list the ops of each phase by name")
    parser.add_argument_group("eigh").add_argument(
        "--eigh-repeats", type=int, default=50, help="timed decompositions per variant"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    names = list(SECTIONS) if args.section == "all" else [args.section]
    return {name: SECTIONS[name](args) for name in names}


if __name__ == "__main__":
    main()
