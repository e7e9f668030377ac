"""Row 3: representation quality at equal budget, kNN top-1 on scikit-learn's digits.

The 1,797 handwritten digits (8x8 grey levels) are upscaled to ``IMAGE_SIZE`` px RGB and
written as a data_prep-shaped folder. Both MoCo implementations pre-train on all of them
without labels, for the same epochs, with the same batch, queue / memory bank, key momentum,
temperature, MoCo v2 augmentation parameters and the same resnet18 with the small-image stem
(3x3 stride-1 conv, no max-pool): the project through ``run_moco_train`` and lightly through
the loop of ``benchmarks.bench_moco``, each in a child process.

Evaluation (the same for all four encoders): embeddings of the deterministic view
(``sslpipe.moco.eval_transform``), a stratified 10% of the images as the labelled kNN bank and
the other 90% as queries, cosine kNN with k=20 (``sslpipe.moco.knn_top1``, similarity-weighted
vote). Compared: the project's MoCo backbone, lightly's MoCo backbone, the same network with
random initialisation, and the raw (normalised) pixels.

The budget at which MoCo overtakes the random-init encoder comes from the per-epoch
leave-one-out kNN (k=20, all labels) that the project's kNN monitor computes (epoch 0 is the
random initialisation), and the same measure computed for lightly after every epoch.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

IMAGE_SIZE = 16  # the digits are 8x8: 16 px keeps every pixel at a quarter of 32 px's compute
# On 2 CPU cores one epoch over the 1,797 digits costs about 150 CPU-seconds per implementation
# (resnet18 at 16 px, plus the per-epoch kNN monitor): quick mode trains on a random third.
QUICK = {"images": 600, "epochs": 1, "batch": 64, "queue": 512, "workers": 1}
FULL = {"images": 1797, "epochs": 5, "batch": 64, "queue": 1024, "workers": 1}
K = 20
BANK_FRACTION = 0.1


def make_digits_folder(
    folder: Path, image_size: int, count: int | None = None
) -> tuple[Path, list[int]]:
    """The digits (all, or a seeded random ``count``) as RGB PNGs with their labels in
    manifest.csv; returns (folder, labels)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    total = len(digits.target)
    keep: list[int] = list(range(total))
    if count is not None and count < total:
        keep = sorted(np.random.default_rng(0).permutation(total)[:count].tolist())
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["id,path,label,width,height"]
    labels: list[int] = []
    for i in keep:
        pixels, label = digits.images[i], int(digits.target[i])
        labels.append(label)
        grey = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8), mode="L")
        image = grey.resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")
        name = f"{i:04d}.png"
        image.save(images / name)
        rows.append(f"{name},images/{name},{label},{image_size},{image_size}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder, labels


def _pixels(data_dir: Path, image_size: int) -> Any:
    """(N, 3, S, S) normalised eval views of the folder's images, in manifest order."""
    import torch
    from PIL import Image

    from sslpipe.moco import eval_transform

    transform = eval_transform(image_size)
    lines = (data_dir / "manifest.csv").read_text().splitlines()[1:]
    views = []
    for line in lines:
        with Image.open(data_dir / line.split(",")[1]) as image:
            views.append(transform(image.convert("RGB")))
    return torch.stack(views)


def _labels(data_dir: Path) -> Any:
    import torch

    lines = (data_dir / "manifest.csv").read_text().splitlines()[1:]
    return torch.tensor([int(line.split(",")[2]) for line in lines])


def embed(backbone: Any, pixels: Any) -> Any:
    """Backbone features (N, D) of the views, in eval mode, without gradients."""
    import torch

    backbone.eval()
    with torch.no_grad():
        return torch.cat([backbone(x).flatten(1) for x in pixels.split(256)])


def loo_knn_of(backbone: Any, data_dir: Path, image_size: int) -> float:
    """Leave-one-out kNN top-1 (k=20, all labels), the measure of the project's kNN monitor."""
    from sslpipe.moco import leave_one_out_knn_top1

    features = embed(backbone, _pixels(data_dir, image_size))
    return leave_one_out_knn_top1(features, _labels(data_dir), k=K)


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
    from sslpipe.moco import knn_top1

    return knn_top1(features[bank], labels[bank], features[queries], labels[queries], k=K)


def run(quick: bool) -> list[dict[str, Any]]:
    """Row 3: kNN top-1 of project MoCo, lightly MoCo, random init and raw pixels."""
    import torch

    from benchmarks.bench_moco import lightly_backbone, run_child
    from sslpipe.backbone_io import load_backbone_dir
    from sslpipe.moco import BackboneSpec, build_backbone

    plan = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        root = Path(tmp)
        data_dir, label_list = make_digits_folder(root / "data", IMAGE_SIZE, plan["images"])
        settings = {
            "data_dir": str(data_dir),
            "image_size": IMAGE_SIZE,
            "small_stem": True,
            "curve": True,
            "save_backbone": True,
            **plan,
            "images": len(label_list),
        }
        project = run_child("project", settings, root / "project")
        lightly = run_child("lightly", settings, root / "lightly")

        pixels, labels = _pixels(data_dir, IMAGE_SIZE), _labels(data_dir)
        bank, queries = bank_split(label_list, BANK_FRACTION)
        project_backbone, _ = load_backbone_dir(Path(project["model_dir"]))
        lightly_net = lightly_backbone(small_stem=True)
        lightly_net.load_state_dict(
            torch.load(root / "lightly" / "lightly_backbone.pt", weights_only=True)
        )
        torch.manual_seed(0)
        random_backbone, _ = build_backbone(BackboneSpec("resnet18", small_stem=True))
        project_curve = json.loads((Path(project["model_dir"]) / "metrics.json").read_text())[
            "knn_top1"
        ]
        scores = {
            "project": bank_knn(embed(project_backbone, pixels), labels, bank, queries),
            "lightly": bank_knn(embed(lightly_net, pixels), labels, bank, queries),
            "random": bank_knn(embed(random_backbone, pixels), labels, bank, queries),
            "pixels": bank_knn(pixels.flatten(1), labels, bank, queries),
        }
    return [_row(scores, project_curve, lightly["curve"], plan, project, lightly)]


def _overtakes(curve: list[float]) -> str:
    """First epoch whose kNN beats epoch 0 (random init), or 'not within N epochs'."""
    for epoch, value in enumerate(curve[1:], start=1):
        if value > curve[0]:
            return f"epoch {epoch}"
    return f"not within {len(curve) - 1} epochs"


def _row(
    scores: dict[str, float],
    project_curve: list[float],
    lightly_curve: list[float],
    plan: dict[str, int],
    project: dict[str, Any],
    lightly: dict[str, Any],
) -> dict[str, Any]:
    gap = scores["project"] - scores["lightly"]
    curves = (
        f"leave-one-out kNN per epoch (epoch 0 = random init): project "
        f"{[round(v, 3) for v in project_curve]}, lightly {[round(v, 3) for v in lightly_curve]}"
    )
    return {
        "row": "3. representation quality at equal budget (digits kNN top-1)",
        "project": round(scores["project"], 4),
        "baseline": round(scores["lightly"], 4),
        "unit": "kNN top-1",
        "ratio": round(scores["project"] / scores["lightly"], 3),
        "target": "project >= lightly - 0.01",
        "met": gap >= -0.01,
        "notes": (
            f"resnet18 small stem, {IMAGE_SIZE} px, {plan['epochs']} epoch(s), batch "
            f"{plan['batch']}, queue {plan['queue']}, {plan['images']} digits (pre-training on "
            f"all of them, without labels); bank {BANK_FRACTION:.0%} stratified, queries the "
            f"other 90%, k={K} cosine; "
            f"random-init encoder {scores['random']:.4f}, raw pixels {scores['pixels']:.4f}; "
            f"MoCo overtakes random init: project {_overtakes(project_curve)}, lightly "
            f"{_overtakes(lightly_curve)}; {curves}; training wall s project "
            f"{project['total_s']:.0f}, lightly {lightly['total_s']:.0f}"
        ),
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Row 3: representation quality vs lightly")
    parser.add_argument("--quick", action="store_true")
    for row in run(parser.parse_args().quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
