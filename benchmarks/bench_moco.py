"""Row 2: moco_train throughput and peak memory against lightly's MoCo on the CPU.

Both sides train the same network (torchvision resnet18 with a 2048-128 MLP head, key
momentum 0.99, temperature 0.2, SGD lr 0.03 / momentum 0.9 / weight decay 5e-4, cosine lr), on
the same data_prep-shaped folder of photo-like JPEGs (112 px on the shorter side), with the
same batch, crop size (112 px), queue / memory-bank size, MoCo v2 augmentation parameters and
number of DataLoader workers:

* project: ``sslpipe.steps.moco_train.run_moco_train``, exactly what a user runs (MLflow
  tracking, a checkpoint every epoch, the backbone folder at the end; no registration). Its
  per-epoch images/s are read from its own log lines.
* lightly: the plain PyTorch loop of lightly's MoCo example: ``MoCoV2Transform`` on a
  ``LightlyDataset`` of the folder, a ``DataLoader`` with ``shuffle`` and ``drop_last``,
  ``MoCoProjectionHead``, ``NTXentLoss(memory_bank_size=...)``, ``update_momentum`` before every
  step and ``deactivate_requires_grad`` on the momentum copies.

Every training run is a child process of its own (``python -m benchmarks.bench_moco --child``),
runs alternate project / lightly, and the row reports medians over the repeats of each run's
median epoch throughput after a warm-up epoch. Peak memory is the child's maximum resident set
(``wait4``'s ``ru_maxrss``: the larger of the training process and its reaped DataLoader
workers, not their sum).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Shared training settings of both sides (MoCo v2 head and loss, small-data queue and momentum).
HEAD_HIDDEN = 2048
HEAD_OUT = 128
KEY_MOMENTUM = 0.99
TEMPERATURE = 0.2
LR = 0.03
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
FEATURE_DIM = 512  # resnet18

RECIPE_FIELDS = (
    "lr",
    "warmup_epochs",
    "weight_decay",
    "temperature",
    "key_momentum",
    "crop_min_scale",
    "jitter_strength",
    "jitter_p",
    "grayscale_p",
    "blur_p",
    "horizontal_flip_p",
    "sgd_momentum",
    "projection_dim",
    "projection_hidden_dim",
)
"""The MoCo v2 recipe both trainers take (``sslpipe.core.config.MocoConfig`` field names); the
queue, batch, epochs, image size and network are the budget, passed on their own."""

ROW2_RECIPE: dict[str, float] = {
    "lr": LR,
    "warmup_epochs": 0.0,
    "weight_decay": WEIGHT_DECAY,
    "temperature": TEMPERATURE,
    "key_momentum": KEY_MOMENTUM,
    # MoCo v2's augmentations: ColorJitter(0.4, 0.4, 0.4, 0.1) at p=0.8, grayscale 0.2, blur
    # sigma (0.1, 2) at p=0.5, crop scale (0.2, 1), horizontal flip.
    "crop_min_scale": 0.2,
    "jitter_strength": 0.4,
    "jitter_p": 0.8,
    "grayscale_p": 0.2,
    "blur_p": 0.5,
    "horizontal_flip_p": 0.5,
    "sgd_momentum": SGD_MOMENTUM,
    "projection_dim": HEAD_OUT,
    "projection_hidden_dim": HEAD_HIDDEN,
}
"""Row 2's recipe, fixed here so that its throughput comparison does not move with the
project's defaults (row 3 reads its recipe from ``MocoConfig()`` instead)."""


def _recipe(recipe: dict[str, float] | None) -> dict[str, float]:
    """``recipe`` (default :data:`ROW2_RECIPE`), checked to hold exactly :data:`RECIPE_FIELDS`."""
    chosen = dict(ROW2_RECIPE if recipe is None else recipe)
    missing, unknown = set(RECIPE_FIELDS) - set(chosen), set(chosen) - set(RECIPE_FIELDS)
    if missing or unknown:
        raise ValueError(
            f"a MoCo recipe needs exactly the fields {RECIPE_FIELDS}; missing "
            f"{sorted(missing)}, unknown {sorted(unknown)}"
        )
    return chosen


QUICK = {"images": 96, "batch": 32, "queue": 64, "epochs": 3, "repeats": 2, "workers": 1}
FULL = {"images": 256, "batch": 64, "queue": 128, "epochs": 4, "repeats": 3, "workers": 1}
IMAGE_SIZE = 112


# ---------------------------------------------------------------------------------- data


def make_photo_folder(folder: Path, count: int, *, short_side: int = 112, seed: int = 0) -> Path:
    """A data_prep-shaped folder (images/, manifest.csv) of ``count`` photo-like JPEGs.

    Random 4:3 crops of scikit-learn's two sample photos, resized to ``short_side`` on the
    shorter side like data_prep's output, no labels (so moco_train runs no kNN monitor).
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    long_side = round(short_side * 4 / 3)
    rows = ["id,path,label,width,height"]
    for i in range(count):
        photo = photos[i % len(photos)]
        w = int(rng.integers(photo.width // 4, photo.width))
        h = min(photo.height, w * 3 // 4)
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        crop = photo.crop((x, y, x + w, y + h)).resize(
            (long_side, short_side), Image.Resampling.BILINEAR
        )
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        name = f"{i:05d}.jpg"
        crop.save(images / name, quality=90)
        rows.append(f"{name},images/{name},,{long_side},{short_side}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


# ----------------------------------------------------------------------- the two trainers


def project_moco_train(
    data_dir: Path,
    work: Path,
    *,
    image_size: int,
    batch: int,
    queue: int,
    epochs: int,
    workers: int,
    small_stem: bool = False,
    seed: int = 0,
    recipe: dict[str, float] | None = None,
    on_epoch: Callable[[int, Any], None] | None = None,
) -> dict[str, Any]:
    """Run the project's moco_train step; returns epoch seconds, images per epoch, backbone dir.

    ``recipe``: the MoCo v2 hyperparameters (:data:`RECIPE_FIELDS`; default :data:`ROW2_RECIPE`);
    the seed's extra augmentations (vertical flip, rotation) stay off, as on lightly's side.
    ``on_epoch(epoch, backbone)`` goes to ``run_moco_train`` (after every epoch, 1, 2, ...).
    """
    # A tracking store of the run's own, never the user's.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "bench"
    os.environ["SSLPIPE_ARTIFACT_ROOT"] = str(work / "mlartifacts")
    from sslpipe.core.config import MocoConfig
    from sslpipe.steps.moco_train import run_moco_train

    rates: list[float] = []
    cpu_marks = [_cpu_seconds()]
    pattern = re.compile(r"epoch \d+/\d+: .* ([\d.]+) images/s")

    class _Rates(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = pattern.search(record.getMessage())
            if match:
                rates.append(float(match.group(1)))
                cpu_marks.append(_cpu_seconds())

    handler = _Rates()
    logging.getLogger("sslpipe.moco_train").addHandler(handler)
    config = MocoConfig(
        backbone="resnet18",
        small_stem=small_stem,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch,
        queue_size=queue,
        vertical_flip=False,
        rotation_degrees=0.0,
        num_workers=workers,
        seed=seed,
        **_recipe(recipe),
    )
    started = time.perf_counter()
    try:
        run_moco_train(
            data_dir=data_dir,
            model_dir=work / "model",
            checkpoint_dir=work / "checkpoint",
            config=config,
            resume=False,
            register=False,
            on_epoch=on_epoch,
        )
    finally:
        logging.getLogger("sslpipe.moco_train").removeHandler(handler)
    return {
        "rates": rates,
        "epoch_cpu_s": [b - a for a, b in itertools.pairwise(cpu_marks)],
        "total_s": time.perf_counter() - started,
        "model_dir": str(work / "model"),
    }


def lightly_backbone(small_stem: bool) -> Any:
    """torchvision resnet18 without its classifier, as lightly's examples build it."""
    import torchvision
    from torch import nn

    resnet = torchvision.models.resnet18()
    if small_stem:  # the CIFAR stem of lightly's benchmarks: 3x3 stride-1 conv, no max-pool
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        resnet.maxpool = nn.Identity()
    return nn.Sequential(*list(resnet.children())[:-1])


def lightly_moco_model(backbone: Any, hidden: int, out: int) -> Any:
    """The MoCo module of lightly's MoCo example: ``backbone`` with a projection head, and
    their momentum copies for the keys."""
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad
    from torch import nn

    class MoCo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.projection_head = MoCoProjectionHead(FEATURE_DIM, hidden, out)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x: Any) -> Any:
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def forward_momentum(self, x: Any) -> Any:
            key = self.backbone_momentum(x).flatten(start_dim=1)
            return self.projection_head_momentum(key).detach()

    return MoCo()


def lightly_transform(image_size: int, recipe: dict[str, float] | None = None) -> Any:
    """lightly's ``MoCoV2Transform`` with the recipe's augmentations (:data:`RECIPE_FIELDS`):
    colour jitter of brightness, contrast and saturation at the jitter strength and of hue at a
    quarter of it, blur sigma (0.1, 2), no vertical flip or rotation."""
    from lightly.transforms import MoCoV2Transform

    r = _recipe(recipe)
    strength = r["jitter_strength"]
    return MoCoV2Transform(
        input_size=image_size,
        cj_prob=r["jitter_p"],
        cj_strength=1.0,
        cj_bright=strength,
        cj_contrast=strength,
        cj_sat=strength,
        cj_hue=strength / 4,
        min_scale=r["crop_min_scale"],
        random_gray_scale=r["grayscale_p"],
        gaussian_blur=r["blur_p"],
        sigmas=(0.1, 2.0),
        hf_prob=r["horizontal_flip_p"],
        vf_prob=0.0,
        rr_prob=0.0,
    )


def lightly_moco_train(
    images_dir: Path,
    *,
    image_size: int,
    batch: int,
    queue: int,
    epochs: int,
    workers: int,
    small_stem: bool = False,
    seed: int = 0,
    on_epoch: Callable[[int, Any], None] | None = None,
    recipe: dict[str, float] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """lightly's MoCo v2 in the plain PyTorch loop of its examples; returns rates and backbone.

    ``recipe``: the MoCo v2 hyperparameters (:data:`RECIPE_FIELDS`, the project's names;
    default :data:`ROW2_RECIPE`), mapped onto ``MoCoV2Transform``, ``MoCoProjectionHead``,
    ``NTXentLoss``, ``update_momentum`` and SGD. ``on_epoch(epoch, backbone)`` is called with
    the random initialisation (epoch 0) and after every epoch.
    """
    import torch
    from lightly.data import LightlyDataset
    from lightly.loss import NTXentLoss
    from lightly.models.utils import update_momentum

    from sslpipe.core.config import MocoConfig
    from sslpipe.models.moco.recipe import lr_at

    r = _recipe(recipe)
    hidden, out = int(r["projection_hidden_dim"]), int(r["projection_dim"])
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = lightly_moco_model(lightly_backbone(small_stem), hidden, out).to(device)
    transform = lightly_transform(image_size, r)
    dataset = LightlyDataset(input_dir=str(images_dir), transform=transform)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers
    )
    criterion = NTXentLoss(temperature=r["temperature"], memory_bank_size=(queue, out)).to(device)
    lr, key_momentum = r["lr"], r["key_momentum"]
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=r["sgd_momentum"], weight_decay=r["weight_decay"]
    )
    # The project's schedule (cosine after a linear warm-up, set per step), so that both sides
    # train with the same learning rate at every step.
    schedule = MocoConfig(lr=lr, epochs=epochs, warmup_epochs=r["warmup_epochs"])
    rates: list[float] = []
    cpu_marks = [_cpu_seconds()]
    if on_epoch is not None:
        on_epoch(0, model.backbone)  # random init, like the project's epoch-0 kNN monitor
    for epoch in range(epochs):
        model.train()
        epoch_started, images = time.perf_counter(), 0
        for step, (batch_views, _, _) in enumerate(dataloader):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(schedule, epoch, (step + 1) / len(dataloader))
            x_query, x_key = (x.to(device, non_blocking=True) for x in batch_views)
            update_momentum(model.backbone, model.backbone_momentum, m=key_momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=key_momentum)
            query = model(x_query)
            key = model.forward_momentum(x_key)
            loss = criterion(query, key)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            images += x_query.shape[0]
        rates.append(images / (time.perf_counter() - epoch_started))
        cpu_marks.append(_cpu_seconds())
        if on_epoch is not None:
            on_epoch(epoch + 1, model.backbone)
    return {
        "rates": rates,
        "epoch_cpu_s": [b - a for a, b in itertools.pairwise(cpu_marks)],
        "total_s": time.perf_counter() - started,
        "backbone": model.backbone,
    }


# --------------------------------------------------------------------------- child runs


def _child(args: argparse.Namespace) -> None:
    settings = json.loads(args.settings)
    data_dir, work = Path(settings["data_dir"]), Path(settings["work"])
    seed = settings.get("seed", 0)
    common = {
        "image_size": settings["image_size"],
        "batch": settings["batch"],
        "queue": settings["queue"],
        "epochs": settings["epochs"],
        "workers": settings["workers"],
        "small_stem": settings.get("small_stem", False),
        "seed": seed,
        "recipe": settings.get("recipe"),  # None: row 2's
    }
    evaluator = None
    if settings.get("evaluate"):  # row 3: kNN and linear probe per epoch, computed in here
        from benchmarks.bench_quality import Evaluator

        evaluator = Evaluator(
            data_dir,
            settings["image_size"],
            epochs=settings["epochs"],
            every=settings.get("eval_every", 1),
        )
    cpu0 = _cpu_seconds()
    if args.child == "project":
        if evaluator is not None:  # epoch 0: the network moco_train starts from
            evaluator.random_init(small_stem=common["small_stem"], seed=seed)
        result = project_moco_train(data_dir, work, **common, on_epoch=evaluator)
    else:
        result = lightly_moco_train(
            data_dir / "images",
            **common,
            on_epoch=evaluator,
            device=settings.get("device", "cpu"),
        )
    cpu = _cpu_seconds() - cpu0
    images = settings["epochs"] * (settings["images"] // settings["batch"]) * settings["batch"]
    out = {
        "rates": result["rates"],
        "epoch_cpu_s": result["epoch_cpu_s"],
        "total_s": result["total_s"],
        "images": images,
        "cpu_s": cpu,
        "threads": __import__("torch").get_num_threads(),
        "curve": [] if evaluator is None else evaluator.curve,
        "eval_s": 0.0 if evaluator is None else evaluator.seconds,
        "model_dir": result.get("model_dir"),
    }
    Path(args.out).write_text(json.dumps(out))


def _cpu_seconds() -> float:
    import resource

    self_, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def run_child(side: str, settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """One training run in a child process: its result plus peak RSS (MB) and wall seconds."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "result.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_moco",
            "--child",
            side,
            "--settings",
            json.dumps({**settings, "work": str(work)}),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{side} child failed ({process.returncode}):\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    result["wall_s"] = time.perf_counter() - started
    return result


def _steady(values: list[float]) -> float:
    """Median of per-epoch values after the first (warm-up) epoch."""
    return statistics.median(values[1:] if len(values) > 1 else values)


_steady_rate = _steady


def run(quick: bool) -> list[dict[str, Any]]:
    """Row 2: median images/s and peak RSS of project vs lightly, interleaved child runs."""
    plan = QUICK if quick else FULL
    results: dict[str, list[dict[str, Any]]] = {"project": [], "lightly": []}
    with tempfile.TemporaryDirectory(prefix="bench_moco_") as tmp:
        root = Path(tmp)
        data_dir = make_photo_folder(root / "data", plan["images"], short_side=IMAGE_SIZE)
        settings = {
            "data_dir": str(data_dir),
            "image_size": IMAGE_SIZE,
            "images": plan["images"],
            "batch": plan["batch"],
            "queue": plan["queue"],
            "epochs": plan["epochs"],
            "workers": plan["workers"],
        }
        for repeat in range(plan["repeats"]):
            # Alternate which side goes first, so neither always meets the same neighbours.
            order = ("project", "lightly") if repeat % 2 == 0 else ("lightly", "project")
            for side in order:
                results[side].append(run_child(side, settings, root / f"{side}{repeat}"))
    return [*_rows(results, plan), _gpu_row()]


def _gpu_row() -> dict[str, Any]:
    """The issue's GPU variant (bf16, GPU utilisation, MFU; resnet18 at 112 px and resnet50
    at 224 px), which is not written: no GPU was at hand to measure it with."""
    import torch

    from benchmarks.common import not_run

    here = "a GPU is present, but" if torch.cuda.is_available() else "no GPU on this machine;"
    return not_run(
        "2. moco_train throughput vs lightly MoCo (GPU)",
        f"{here} the GPU variant of this row is not written yet (no GPU was at hand to build "
        "and check it)",
    )


def _rows(results: dict[str, list[dict[str, Any]]], plan: dict[str, int]) -> list[dict[str, Any]]:
    rate = {s: statistics.median(_steady_rate(r["rates"]) for r in rs) for s, rs in results.items()}
    rss = {s: statistics.median(r["peak_rss_mb"] for r in rs) for s, rs in results.items()}
    per_epoch = (plan["images"] // plan["batch"]) * plan["batch"]
    per_cpu = {
        s: statistics.median(per_epoch / _steady(r["epoch_cpu_s"]) for r in rs)
        for s, rs in results.items()
    }
    whole = {
        s: statistics.median(r["images"] / r["total_s"] for r in rs) for s, rs in results.items()
    }
    every = {s: [round(_steady_rate(r["rates"]), 1) for r in rs] for s, rs in results.items()}
    ratio = rate["project"] / rate["lightly"]
    threads = results["project"][0]["threads"]
    setup = (
        f"resnet18, {IMAGE_SIZE} px, batch {plan['batch']}, queue {plan['queue']}, "
        f"{plan['images']} images x {plan['epochs']} epochs (first is warm-up), "
        f"{plan['workers']} DataLoader worker(s), torch threads {threads}, "
        f"{plan['repeats']} interleaved repeats"
    )
    return [
        {
            "row": "2. moco_train throughput vs lightly MoCo (CPU)",
            "project": round(rate["project"], 2),
            "baseline": round(rate["lightly"], 2),
            "unit": "images/s",
            "ratio": round(ratio, 3),
            "target": ">= 1.2x lightly",
            "met": ratio >= 1.2,
            "notes": (
                f"{setup}; per-run medians project {every['project']}, lightly "
                f"{every['lightly']}; images per CPU-second of an epoch after warm-up (all "
                f"processes, the project's including its checkpoint; less sensitive to other "
                f"load) project {per_cpu['project']:.2f} vs lightly "
                f"{per_cpu['lightly']:.2f} ({per_cpu['project'] / per_cpu['lightly']:.2f}x); "
                f"whole call incl. setup/checkpoints project {whole['project']:.2f} vs "
                f"lightly {whole['lightly']:.2f} images/s"
            ),
        },
        {
            "row": "2. moco_train peak RSS vs lightly MoCo",
            "project": round(rss["project"], 1),
            "baseline": round(rss["lightly"], 1),
            "unit": "MB",
            "ratio": round(rss["lightly"] / rss["project"], 3),
            "target": "report (lower is better)",
            "met": None,
            "notes": (
                "max RSS of the training child (wait4 ru_maxrss: the larger of the trainer and "
                "its DataLoader workers); the project's includes MLflow and its other imports"
            ),
        },
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--child", choices=("project", "lightly"))
    parser.add_argument("--settings")
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    for row in run(args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
