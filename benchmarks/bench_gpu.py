"""GPU throughput (one GPU): moco_train end to end against lightly's loop and the compute ceiling.

Issue 15, item 4. With CUDA, one run measures, each in a fresh child process
(:func:`benchmarks.common.in_child`), on the same generated photo-like images (149x112 JPEGs and
manifest.csv like data_prep's output at image_size 112, plus the packed array data_prep writes
beside them when the project has one: :func:`prepare_data`), with the same batch, queue, crop
size and DataLoader workers:

* **project** (:func:`project_end_to_end`): ``sslpipe.steps.moco_train.run_moco_train``
  (``register=False``, ``resume=False``) exactly as a user runs it, its defaults deciding where
  the crops come from (``moco.views``) and the precision (``moco.precision``): data loading,
  the augmentations, tracking, a checkpoint every epoch and the backbone folder at the end. Its
  images/s per epoch come from its own log lines (``epoch i/n: ... X images/s``), and its
  ``views:`` and ``precision:`` lines go in the notes.
* **lightly** (:func:`lightly_loop`): lightly's MoCo v2 in the plain PyTorch loop of its example
  (``MoCoV2Transform`` on a ``LightlyDataset``, ``MoCoProjectionHead``, ``NTXentLoss`` with a
  memory bank, ``update_momentum``) on the JPEGs, configured as lightly's own benchmarks run it
  on a GPU: model, loss and batches on the device, persistent DataLoader workers, pinned
  memory, ``non_blocking`` copies, mixed precision (the same as the project's) and
  ``torch.set_float32_matmul_precision("high")``.
* **ceiling** (:func:`compute_ceiling`): the project's own model
  (``sslpipe.models.moco.recipe.build_model``, channels-last) on random tensors already on the
  device: query forward and backward, key forward (with the momentum update and the queue),
  fused SGD step; eager and ``torch.compile``d (default mode), under the project's precision.
  What is compiled are the four encoders (query and key backbone and projection head), where
  the compute is; the momentum update, the queue and the loss stay eager. Compiling the whole
  ``MoCo`` module (``scope="model"``) fails in training: AOTAutograd saves the queue's buffers
  for the backward pass (recomputing the negatives' mask from them), and the enqueue then
  modifies them in place ("modified by an inplace operation", torch 2.14).
  No data loading, no augmentation, no per-step host synchronisation: what the GPU can do with
  this model, so project / compiled ceiling is the share of it the whole step delivers.

Steady state: the **best epoch after the first** (the first pays for worker start-up and
cuDNN's autotuning), the same rule on both training sides; every epoch is in the notes. The
ceiling times ``steps`` steps after ``warmup`` steps (the compile happens in the first).

Targets (the seed's workload: 15,000 images x 100 epochs at 112 px, resnet18, batch 256, queue
4,096, on one H200): the projected end-to-end time for 1.5 M samples <= 120 s, i.e. >= 12,500
images/s with data loading included; >= 0.8 of the compiled ceiling; ahead of lightly's loop.
The projection (:func:`projected_seconds`) adds the run's measured set-up, its one-off first-epoch
warm-up and 99 per-epoch overheads (checkpoint, bookkeeping) to 1.5 M samples at the steady rate.

Without CUDA the row says "not run: no GPU". ``--rehearse-cpu`` runs the whole row on the CPU at
a tiny size (32 px, 64 images, batch 16, one epoch), to check it works before a GPU session: its
output is a rehearsal, not a measurement.

    .venv/bin/python -m benchmarks.bench_gpu --rehearse-cpu   # here: a tiny CPU rehearsal
    python -m benchmarks.run --only gpu --output /tmp/gpu.md  # on a GPU machine: the row
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.bench_moco import ROW2_RECIPE, make_photo_folder
from benchmarks.common import environment, in_child, log, markdown_table, not_run, row

TITLE = "7. GPU throughput (one GPU)"
SEED_IMAGES, SEED_EPOCHS = 15_000, 100
SEED_SAMPLES = SEED_IMAGES * SEED_EPOCHS
"""The seed's workload: 1.5 M samples (15,000 images x 100 epochs at 112 px, batch 256)."""
TARGET_SECONDS = 120.0
TARGET_RATE = SEED_SAMPLES / TARGET_SECONDS  # 12,500 images/s
TARGET_OF_CEILING = 0.8
REHEARSAL_LABEL = "CPU REHEARSAL at a tiny size, not a measurement"
NO_GPU = "not run: no GPU (torch.cuda.is_available() is False)"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run of the row; ``workers`` 0 means all cores but one, at most 15."""

    images: int
    image_size: int
    batch: int
    queue: int
    epochs: int
    workers: int
    warmup: int
    steps: int
    device: str = "cuda"
    rehearsal: bool = False
    timeout_s: float = 300.0

    def resolved(self) -> Plan:
        workers = self.workers or min(15, max(1, (os.cpu_count() or 2) - 1))
        return replace(self, workers=workers)

    @property
    def images_per_epoch(self) -> int:
        batch = min(self.batch, self.images)
        return self.images // batch * batch


GPU_PLAN = Plan(
    images=6144, image_size=112, batch=256, queue=4096, epochs=5, workers=0, warmup=10, steps=50
)
"""The seed's step (112 px, resnet18, batch 256, queue 4,096) on 6,144 images, 5 epochs."""
GPU_QUICK = replace(GPU_PLAN, images=3072, epochs=3, steps=20)
REHEARSAL = Plan(
    images=64,
    image_size=32,
    batch=16,
    queue=32,
    epochs=1,
    workers=1,
    warmup=1,
    steps=2,
    device="cpu",
    rehearsal=True,
    timeout_s=900.0,
)
"""The CPU rehearsal: every measurement at a tiny size, to check the row runs."""


# ----------------------------------------------------------------------- shared helpers


def _failure(where: str, err: BaseException) -> dict[str, Any]:
    """A measurement's result when it failed: the error, for the table, instead of a crash."""
    traceback.print_exc(file=sys.stderr)
    return {"error": f"{where}: {type(err).__name__}: {err}"[:600]}


def resolve_precision(device: Any, requested: str = "auto") -> tuple[Any, str]:
    """(autocast dtype or None, label) of the project's training precision on ``device``.

    ``requested`` "auto": the default of ``MocoConfig().precision`` when the project has that
    setting, else "auto" (labelled as assumed). "auto" means what moco_train makes of it: bf16
    autocast on a CUDA device that supports it, fp32 otherwise. "bf16..." is bfloat16,
    "fp16"/"16-mixed" float16, anything else fp32. The CPU always gets fp32.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None, "fp32 (CPU)"
    if requested == "auto":
        configured = _configured_precision()
        if configured is None:
            value, source = "auto", "assumed: MocoConfig has no precision setting yet"
        else:
            value, source = configured, f"moco.precision={configured}"
    else:
        value, source = requested, "requested"
    name = value.lower()
    if name == "auto":
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if "bf16" in name or "bfloat16" in name:
        return torch.bfloat16, f"bf16 autocast ({source})"
    if "16" in name:
        return torch.float16, f"fp16 autocast ({source})"
    return None, f"fp32 ({source})"


def _configured_precision() -> str | None:
    try:
        from sslpipe.core.config import MocoConfig
    except Exception:  # the training core does not import here: not this function's report
        return None
    value = getattr(MocoConfig(), "precision", None)
    return None if value is None else str(value)


def _synchronize(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def steady_rate(rates: list[float]) -> float:
    """The steady-state images/s of a run: its best epoch after the first (warm-up) one."""
    if not rates:
        return math.nan
    return max(rates[1:]) if len(rates) > 1 else rates[0]


# --------------------------------------------------------------------- (a) the ceiling


def compute_ceiling(
    *,
    image_size: int,
    batch: int,
    queue: int,
    warmup: int,
    steps: int,
    device: str,
    compiled: bool,
    precision: str = "auto",
    backend: str = "inductor",
    scope: str = "encoders",
    seed: int = 0,
) -> dict[str, Any]:
    """images/s of the project's training step on random tensors already on ``device``.

    The model is ``build_model`` of a ``MocoConfig`` at ``image_size`` (resnet18, row 2's
    recipe, shuffle-BN), trained by fused SGD; a step is ``model(x_query, x_key, ids)`` (query
    forward, momentum update, key forward, loss, enqueue) under the precision's autocast,
    ``backward`` and the optimizer step. ``compiled``: with ``torch.compile`` (``backend``)
    applied to the four encoders (``scope="encoders"``) or to the whole module
    (``scope="model"``); the first step, compile included, is timed apart (``first_step_s``).
    """
    try:
        import torch

        from sslpipe.core.config import MocoConfig
        from sslpipe.models.moco.recipe import build_model
    except Exception as err:
        return _failure("importing the training core (sslpipe.steps.moco_train)", err)
    try:
        return _ceiling(
            torch, MocoConfig, build_model, image_size=image_size, batch=batch, queue=queue,
            warmup=warmup, steps=steps, device=device, compiled=compiled, precision=precision,
            backend=backend, scope=scope, seed=seed,
        )  # fmt: skip
    except Exception as err:
        return _failure(f"the {'compiled' if compiled else 'eager'} ceiling", err)


def _ceiling(
    torch: Any,
    config_class: Any,
    build_model: Any,
    *,
    image_size: int,
    batch: int,
    queue: int,
    warmup: int,
    steps: int,
    device: str,
    compiled: bool,
    precision: str,
    backend: str,
    scope: str,
    seed: int,
) -> dict[str, Any]:
    dev = torch.device(device)
    torch.manual_seed(seed)
    config = config_class(
        backbone="resnet18",
        image_size=image_size,
        batch_size=batch,
        queue_size=queue,
        vertical_flip=False,
        rotation_degrees=0.0,
        **ROW2_RECIPE,
    )
    model = build_model(config, queue, dev, batch)
    model.train()
    optimizer = torch.optim.SGD(
        model.query_parameters(),
        lr=config.lr,
        momentum=config.sgd_momentum,
        weight_decay=config.weight_decay,
        fused=dev.type in ("cpu", "cuda"),
    )
    dtype, label = resolve_precision(dev, precision)
    forward = model
    if compiled and scope == "model":
        forward = torch.compile(model, backend=backend)
    elif compiled:
        for name in ENCODERS:  # in place: the model and its state_dict keep their structure
            getattr(model, name).compile(backend=backend)

    def views() -> Any:
        x = torch.randn(batch, 3, image_size, image_size, device=dev)
        return x.contiguous(memory_format=torch.channels_last)

    x_query, x_key = views(), views()
    # Ids walk through a catalog, as an epoch's batches do, so the queue's own-key mask works.
    ids = [torch.arange(i * batch, (i + 1) * batch, device=dev) for i in range(8)]

    def step(i: int) -> None:
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward(x_query, x_key, ids[i % len(ids)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    step(0)
    _synchronize(dev)
    first_step_s = time.perf_counter() - started
    for i in range(1, max(1, warmup)):
        step(i)
    _synchronize(dev)
    started = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _synchronize(dev)
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "rate": steps * batch / seconds,
        "seconds": seconds,
        "steps": steps,
        "first_step_s": first_step_s,
        "precision": label,
        "compiled": compiled,
        "backend": backend if compiled else "eager",
        "scope": scope if compiled else "",
        "device": str(dev),
    }
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if compiled:
        out |= _dynamo_stats()
    return out


def _dynamo_stats() -> dict[str, Any]:
    """How many graphs torch.compile made of the step, and how many graph breaks."""
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return {}
    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


# --------------------------------------------------------------- (b) the project end to end


ENCODERS = ("backbone", "projection_head", "key_backbone", "key_projection_head")
"""The parts of ``MoCo`` the compiled ceiling compiles."""

_EPOCH_LINE = re.compile(r"epoch (\d+)/\d+: .*?([\d.]+) images/s")
_SETUP_LINES = ("views:", "precision:")
"""moco_train's log lines that say how it trains (where the crops come from, autocast)."""


def _import_trainer() -> tuple[Any, Any]:
    """(MocoConfig, run_moco_train): the training core, imported here so a failure is reported."""
    from sslpipe.core.config import MocoConfig
    from sslpipe.steps.moco_train import run_moco_train

    return MocoConfig, run_moco_train


def project_end_to_end(
    *,
    data_dir: str,
    work: str,
    image_size: int,
    batch: int,
    queue: int,
    epochs: int,
    workers: int,
    seed: int = 0,
) -> dict[str, Any]:
    """``run_moco_train(register=False, resume=False)`` on ``data_dir``: the images/s of each
    epoch from its log lines, when each line came (seconds after the call started) and the
    whole call's seconds. A failure, the training core's import included (no MLflow on the
    machine, say), comes back as ``{"error": ...}``."""
    try:
        config_class, run_moco_train = _import_trainer()
    except Exception as err:
        return _failure("importing the training core (sslpipe.steps.moco_train)", err)
    folder = Path(work)
    folder.mkdir(parents=True, exist_ok=True)
    # The run's own tracking store (MLflow when installed, else the local tracker), never the
    # user's.
    tracking = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "bench-gpu",
        "SSLPIPE_ARTIFACT_ROOT": str(folder / "mlartifacts"),
        "SSLPIPE_TRACKING_DIR": str(folder / "tracking"),
    }
    epochs_seen: list[tuple[int, float, float]] = []  # (epoch, images/s, seconds since start)
    said: list[str] = []
    started_at = time.time()

    class _Epochs(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            match = _EPOCH_LINE.search(message)
            if match:
                epoch, rate = int(match.group(1)), float(match.group(2))
                epochs_seen.append((epoch, rate, record.created - started_at))
            elif message.startswith(_SETUP_LINES):
                said.append(message)

    handler = _Epochs()
    logger = logging.getLogger("sslpipe.moco_train")
    logger.addHandler(handler)
    try:
        import torch

        config = config_class(
            backbone="resnet18",
            image_size=image_size,
            epochs=epochs,
            batch_size=batch,
            queue_size=queue,
            vertical_flip=False,
            rotation_degrees=0.0,
            num_workers=workers,
            seed=seed,
            **ROW2_RECIPE,
        )
        with environment(**tracking):
            started = time.perf_counter()
            run_moco_train(
                data_dir=Path(data_dir),
                model_dir=folder / "model",
                checkpoint_dir=folder / "checkpoint",
                config=config,
                resume=False,
                register=False,
            )
            total_s = time.perf_counter() - started
    except Exception as err:
        return _failure("run_moco_train", err)
    finally:
        logger.removeHandler(handler)
    if not epochs_seen:
        return {"error": "run_moco_train logged no 'epoch i/n: ... images/s' line to read"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "rates": [rate for _, rate, _ in epochs_seen],
        "logged_s": [at for _, _, at in epochs_seen],
        "total_s": total_s,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "",
        "precision": _project_precision_label(config, device, said),
        "said": said,
    }


def _project_precision_label(config: Any, device: str, said: list[str]) -> str:
    value = getattr(config, "precision", None)
    logged = [line.split(":", 1)[1].strip() for line in said if line.startswith("precision:")]
    if logged:
        return f"{logged[-1]} (moco.precision={value})"
    if value is not None:
        return f"moco.precision={value}"
    return "fp32 (CPU)" if device == "cpu" else "fp32 (no moco.precision setting yet)"


def projected_seconds(
    rates: list[float],
    logged_s: list[float],
    total_s: float,
    images_per_epoch: int,
    *,
    samples: int = SEED_SAMPLES,
    epochs: int = SEED_EPOCHS,
) -> float:
    """The end-to-end seconds of ``samples`` over ``epochs`` epochs, from a shorter run.

    ``samples`` at the steady rate (:func:`steady_rate`), plus what the run spent outside its
    epochs: the set-up before the first epoch and the work after the last log line (the last
    checkpoint, the backbone folder), the first epoch's extra time over a steady one (worker
    start-up, autotuning) and, ``epochs - 1`` times, the median gap between one epoch's log
    line and the next epoch's start (the checkpoint and bookkeeping of every epoch).
    """
    steady = steady_rate(rates)
    if not rates or not steady or math.isnan(steady):
        return math.nan
    epoch_s = [images_per_epoch / rate for rate in rates]
    setup = max(0.0, logged_s[0] - epoch_s[0]) + max(0.0, total_s - logged_s[-1])
    warmup = max(0.0, epoch_s[0] - images_per_epoch / steady)
    gaps = [max(0.0, logged_s[i] - logged_s[i - 1] - epoch_s[i]) for i in range(1, len(logged_s))]
    per_epoch = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
    return setup + warmup + samples / steady + (epochs - 1) * per_epoch


# ------------------------------------------------------------------- (c) lightly's loop


def lightly_loop(
    *,
    images_dir: str,
    image_size: int,
    batch: int,
    queue: int,
    epochs: int,
    workers: int,
    device: str,
    precision: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """lightly's MoCo v2 (resnet18, 2048-128 head, row 2's recipe) on ``device``: images/s per
    epoch. Configured as lightly runs it on a GPU: everything on the device, persistent workers,
    pinned memory, non-blocking copies, mixed precision, TF32 matmuls. ``{"error": ...}`` when
    lightly is missing or the loop fails."""
    try:
        import torch
        from lightly.data import LightlyDataset
        from lightly.loss import NTXentLoss
        from lightly.models.utils import update_momentum
    except Exception as err:
        return _failure("importing lightly", err)
    try:
        from benchmarks.bench_moco import lightly_backbone, lightly_moco_model, lightly_transform

        dev = torch.device(device)
        dtype, label = resolve_precision(dev, precision)
        if dev.type == "cuda":
            torch.set_float32_matmul_precision("high")  # lightly's benchmarks' default
        recipe = dict(ROW2_RECIPE)
        hidden, out = int(recipe["projection_hidden_dim"]), int(recipe["projection_dim"])

        torch.manual_seed(seed)
        model = lightly_moco_model(lightly_backbone(small_stem=False), hidden, out).to(dev)
        dataset = LightlyDataset(
            input_dir=images_dir, transform=lightly_transform(image_size, recipe)
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=dev.type == "cuda",
        )
        criterion = NTXentLoss(temperature=recipe["temperature"], memory_bank_size=(queue, out)).to(
            dev
        )
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=recipe["lr"],
            momentum=recipe["sgd_momentum"],
            weight_decay=recipe["weight_decay"],
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
        momentum = recipe["key_momentum"]
        rates: list[float] = []
        for _ in range(epochs):
            model.train()
            _synchronize(dev)
            started, images = time.perf_counter(), 0
            for views, _, _ in loader:
                x_query, x_key = (v.to(dev, non_blocking=True) for v in views)
                update_momentum(model.backbone, model.backbone_momentum, m=momentum)
                update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
                with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                    query = model(x_query)
                    key = model.forward_momentum(x_key)
                    loss = criterion(query, key)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                images += x_query.shape[0]
            _synchronize(dev)
            rates.append(images / (time.perf_counter() - started))
            scheduler.step()
        del loader
    except Exception as err:
        return _failure("lightly's MoCo loop", err)
    return {"rates": rates, "precision": label, "device": str(dev)}


# ---------------------------------------------------------------------- running the row


def measure(plan: Plan) -> dict[str, dict[str, Any]]:
    """Every measurement of the row, each in a child process, on one generated folder; a
    failed one is ``{"error": ...}``. Each result is logged as soon as it is in, so that a
    run stopped midway still shows what it measured."""
    plan = plan.resolved()
    env = {"PYTHONWARNINGS": "ignore"}
    if plan.rehearsal:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the project picks its device itself
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        data_dir, data_note = prepare_data(root / "data", plan)
        log(f"{TITLE}: {data_note} in {time.perf_counter() - started:.0f} s")
        sizes = {"image_size": plan.image_size, "batch": plan.batch, "queue": plan.queue}
        ceiling = {**sizes, "warmup": plan.warmup, "steps": plan.steps, "device": plan.device}
        training = {**sizes, "epochs": plan.epochs, "workers": plan.workers}
        runs: list[tuple[str, str, dict[str, Any]]] = [
            ("ceiling_eager", "compute_ceiling", {**ceiling, "compiled": False}),
            (
                "project",
                "project_end_to_end",
                {**training, "data_dir": str(data_dir), "work": str(root / "project")},
            ),
            (
                "lightly",
                "lightly_loop",
                {**training, "images_dir": str(data_dir / "images"), "device": plan.device},
            ),
            ("ceiling_compiled", "compute_ceiling", {**ceiling, "compiled": True}),
        ]
        for name, function, kwargs in runs:
            log(f"{TITLE}: {name} ...")
            started = time.perf_counter()
            try:
                result = in_child(
                    f"benchmarks.bench_gpu:{function}", timeout_s=plan.timeout_s, env=env, **kwargs
                )
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                result = {"error": f"{name}: {type(err).__name__}: {err}"[-600:]}
            result["wall_s"] = time.perf_counter() - started
            results[name] = result
            log(f"{TITLE}: {name}: {json.dumps(result)[:1500]}")
    results["data"] = {"note": data_note}
    return results


def prepare_data(folder: Path, plan: Plan) -> tuple[Path, str]:
    """data_prep's output for ``plan``: photo-like JPEGs of ``plan.image_size`` px on the shorter
    side and manifest.csv, plus the packed array data_prep writes beside them when the project
    has one (``sslpipe.data.packed_images``); the folder and a note of what it holds."""
    data_dir = make_photo_folder(folder, plan.images, short_side=plan.image_size)
    note = f"{plan.images} JPEGs {round(plan.image_size * 4 / 3)}x{plan.image_size}"
    try:
        from sslpipe.data.packed_images import write_packed
    except ImportError as err:
        return data_dir, f"{note} (no packed array: {err})"
    lines = (data_dir / "manifest.csv").read_text().splitlines()[1:]
    write_packed(data_dir, [line.split(",")[1] for line in lines])
    return data_dir, f"{note} and data_prep's packed array of them"


def target_checks(
    project_rate: float, ceiling_compiled: float, lightly_rate: float, projected_s: float
) -> dict[str, bool | None]:
    """Each target of the issue, met (True), missed (False) or not measurable (None)."""

    def check(*values: float) -> bool:
        return all(isinstance(v, int | float) and not math.isnan(v) and v > 0 for v in values)

    return {
        "projected <= 120 s": projected_s <= TARGET_SECONDS if check(projected_s) else None,
        "project >= 12,500 images/s": (
            project_rate >= TARGET_RATE if check(project_rate) else None
        ),
        ">= 0.8 of the compiled ceiling": (
            project_rate / ceiling_compiled >= TARGET_OF_CEILING
            if check(project_rate, ceiling_compiled)
            else None
        ),
        "ahead of lightly": (
            project_rate > lightly_rate if check(project_rate, lightly_rate) else None
        ),
    }


def _all(*values: bool | None) -> bool | None:
    return None if any(v is None for v in values) else all(values)


def _rate(result: dict[str, Any], key: str = "rate") -> float:
    if "error" in result:
        return math.nan
    if key == "rate":
        return float(result.get("rate", math.nan))
    return steady_rate(result.get("rates", []))


def _epochs(result: dict[str, Any]) -> str:
    return "[" + ", ".join(f"{r:,.0f}" for r in result.get("rates", [])) + "]"


def gpu_rows(results: dict[str, dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """The table rows of ``results`` (from :func:`measure`): project against the compiled
    ceiling, against lightly, and the projected time of the seed's workload; every rate and
    every target's verdict in the notes. A failed measurement's error goes in the notes of the
    rows that need it. A rehearsal judges no target (``met`` null)."""
    plan = plan.resolved()
    empty: dict[str, Any] = {"error": "not measured"}
    project = results.get("project", empty)
    lightly = results.get("lightly", empty)
    eager = results.get("ceiling_eager", empty)
    compiled = results.get("ceiling_compiled", empty)
    project_rate, lightly_rate = _rate(project, "rates"), _rate(lightly, "rates")
    eager_rate, compiled_rate = _rate(eager), _rate(compiled)
    projected = math.nan
    if "error" not in project:
        projected = projected_seconds(
            project["rates"], project["logged_s"], project["total_s"], plan.images_per_epoch
        )
    checks = target_checks(project_rate, compiled_rate, lightly_rate, projected)
    verdicts = "; ".join(
        f"{name}: {'-' if ok is None else 'yes' if ok else 'NO'}" for name, ok in checks.items()
    )
    errors = "; ".join(
        f"{name} failed: {result['error']}"
        for name, result in (
            ("project", project),
            ("lightly", lightly),
            ("eager ceiling", eager),
            ("compiled ceiling", compiled),
        )
        if "error" in result
    )
    device = project.get("gpu") or compiled.get("gpu") or eager.get("gpu") or plan.device
    data = results.get("data", {}).get(
        "note", f"{plan.images} JPEGs {round(plan.image_size * 4 / 3)}x{plan.image_size}"
    )
    said = "; ".join(line for line in project.get("said", []) if line.startswith("views:"))
    setup = (
        f"{device}; resnet18 at {plan.image_size} px, batch {plan.batch}, queue {plan.queue}, "
        f"{data}, {plan.epochs} epoch(s), {plan.workers} DataLoader worker(s)"
        + (f"; project's {said}" if said else "")
        + "; steady state = best epoch after the first"
    )
    rates = (
        f"images/s: project {project_rate:,.0f} (epochs {_epochs(project)}, "
        f"{project.get('precision', '?')}), lightly {lightly_rate:,.0f} (epochs "
        f"{_epochs(lightly)}, {lightly.get('precision', '?')}), ceiling eager {eager_rate:,.0f}"
        f", compiled {compiled_rate:,.0f} ({compiled.get('precision', '?')}; "
        f"{compiled.get('scope', '?')} compiled; compile + first step "
        f"{compiled.get('first_step_s', math.nan):.0f} s, {compiled.get('graphs', '?')} "
        f"graph(s), {compiled.get('graph_breaks', '?')} graph break(s))"
    )
    if plan.rehearsal:
        verdicts = "not judged in a rehearsal"
    notes = f"{setup}; {rates}; targets: {verdicts}" + (f"; {errors}" if errors else "")
    if plan.rehearsal:
        notes = f"{REHEARSAL_LABEL}; {notes}"
    prefix = f"{TITLE} [{REHEARSAL_LABEL}]" if plan.rehearsal else TITLE

    def judged(ok: bool | None) -> bool | None:
        return None if plan.rehearsal else ok

    def pair(name: str, baseline: float, target: str, ok: bool | None, why: str) -> dict[str, Any]:
        if math.isnan(project_rate) or math.isnan(baseline):
            return not_run(f"{prefix}: {name}", f"not measured ({why}); {notes}")
        return row(
            f"{prefix}: {name}",
            project=project_rate,
            baseline=baseline,
            unit="images/s",
            higher_is_better=True,
            target=target,
            met=judged(ok),
            notes=notes,
        )

    rows = [
        pair(
            "project vs compiled compute ceiling",
            compiled_rate,
            f">= {TARGET_OF_CEILING}x the compiled ceiling",
            checks[">= 0.8 of the compiled ceiling"],
            "needs the project and the compiled ceiling",
        ),
        pair(
            "project vs lightly's loop on the GPU",
            lightly_rate,
            "> 1x lightly",
            checks["ahead of lightly"],
            "needs the project and lightly",
        ),
    ]
    name = f"{prefix}: seed workload (1.5 M samples) projected end to end"
    if math.isnan(projected):
        rows.append(not_run(name, f"not measured (needs the project); {notes}"))
    else:
        rows.append(
            row(
                name,
                project=projected,
                baseline=TARGET_SECONDS,
                unit="s",
                higher_is_better=False,
                target=f"<= {TARGET_SECONDS:.0f} s (>= {TARGET_RATE:,.0f} images/s)",
                met=judged(
                    _all(checks["projected <= 120 s"], checks["project >= 12,500 images/s"])
                ),
                notes=(
                    f"{SEED_IMAGES:,} images x {SEED_EPOCHS} epochs: {SEED_SAMPLES:,} samples at "
                    f"{project_rate:,.0f} images/s = {SEED_SAMPLES / project_rate:.0f} s, plus "
                    "the run's set-up, first-epoch warm-up and per-epoch checkpoints = "
                    f"{projected:.0f} s; {notes}"
                ),
            )
        )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    """The GPU row, or one row that says it was not run (no CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return [not_run(TITLE, NO_GPU)]
    plan = GPU_QUICK if quick else GPU_PLAN
    return gpu_rows(measure(plan), plan)


LIGHTLY_PACKAGES = ("lightly", "lightning_utilities", "tqdm")
"""What lightly's MoCo pieces import beyond torch, torchvision, numpy, Pillow and packaging."""


def stage_lightly(target: Path) -> list[str]:
    """Copy the installed lightly and what it imports (:data:`LIGHTLY_PACKAGES`, all pure
    Python) into ``target``, for a GPU machine that cannot install it: put ``target`` on its
    ``PYTHONPATH``. Returns the packages' folders in ``target``."""
    import importlib.util
    import shutil

    copied = []
    for name in LIGHTLY_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{name} is not installed here; pip install -e '.[bench]' first")
        source = Path(next(iter(spec.submodule_search_locations)))
        destination = target / name
        shutil.rmtree(destination, ignore_errors=True)
        shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        copied.append(str(destination))
    return copied


def rehearse_cpu(plan: Plan = REHEARSAL) -> list[dict[str, Any]]:
    """The whole row on the CPU at a tiny size: a check that it runs, not a measurement."""
    return gpu_rows(measure(plan), plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=TITLE)
    parser.add_argument(
        "--rehearse-cpu",
        action="store_true",
        help="run every measurement on the CPU at a tiny size (32 px, 64 images, batch 16, "
        "1 epoch): a rehearsal, not a measurement",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes (with CUDA)")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    parser.add_argument(
        "--stage-lightly",
        type=Path,
        metavar="DIR",
        help="copy the installed lightly (and tqdm, lightning_utilities) into DIR and exit, "
        "to carry to a GPU machine without it (run there with PYTHONPATH=DIR)",
    )
    args = parser.parse_args(argv)
    if args.stage_lightly is not None:
        for folder in stage_lightly(args.stage_lightly):
            print(folder)
        return 0
    if args.rehearse_cpu:
        print(f"*** {REHEARSAL_LABEL} ***", flush=True)
        plan = REHEARSAL
    else:
        import torch

        if not torch.cuda.is_available():
            print(markdown_table([not_run(TITLE, NO_GPU)]))
            return 0
        plan = GPU_QUICK if args.quick else GPU_PLAN
    results = measure(plan)
    if args.json is not None:
        args.json.write_text(json.dumps({"plan": asdict(plan.resolved()), **results}, indent=1))
    print(markdown_table(gpu_rows(results, plan)))
    if args.rehearse_cpu:
        print(f"*** {REHEARSAL_LABEL} ***")
    return 0


if __name__ == "__main__":
    sys.exit(main())
