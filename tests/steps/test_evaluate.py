"""evaluate: metrics equal scikit-learn's, the report, the baselines, registration and the gate."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from azure.ai.ml import load_component
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from sslpipe.cli.component import build_parser, load_spec, run_component
from sslpipe.core.config import EvaluateConfig
from sslpipe.models.training.retrain_guard import GuardDecision, write_skipped
from sslpipe.steps.evaluate import compute_metrics, run_evaluate
from tests.blocked_imports import without_packages
from tests.classifier_testkit import (
    CLASSES,
    FILTER,
    REPO,
    expected_test_labels,
    make_classifier,
    make_data,
    tracking_store,
    write_corrupt,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = REPO / "components" / "evaluate" / "component.yaml"


def assert_equals_sklearn(metrics: dict, y_true: list[str], y_pred: list[str]) -> None:
    classes = metrics["classes"]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    for i, label in enumerate(classes):
        row = metrics["per_class"][label]
        assert row["precision"] == pytest.approx(p[i], abs=1e-12), label
        assert row["recall"] == pytest.approx(r[i], abs=1e-12), label
        assert row["f1"] == pytest.approx(f[i], abs=1e-12), label
        assert row["support"] == s[i], label
    for average, key in (("macro", "macro_avg"), ("weighted", "weighted_avg")):
        ap, ar, af, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=average, zero_division=0
        )
        assert metrics[key]["precision"] == pytest.approx(ap, abs=1e-12)
        assert metrics[key]["recall"] == pytest.approx(ar, abs=1e-12)
        assert metrics[key]["f1"] == pytest.approx(af, abs=1e-12)
        assert metrics[key]["support"] == len(y_true)
    assert metrics["macro_f1"] == metrics["macro_avg"]["f1"]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert metrics["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=classes).tolist()


def test_metrics_equal_scikit_learn_on_hand_made_predictions() -> None:
    y_true = ["cat", "cat", "cat", "dog", "dog", "owl", "owl", "owl", "owl", "eel"]
    y_pred = ["cat", "dog", "cat", "dog", "cat", "owl", "owl", "dog", "owl", "cat"]
    # "eel" is never predicted: its precision is 0 by zero_division=0, not a warning or NaN.
    metrics = compute_metrics(y_true, y_pred, ["cat", "dog", "eel", "owl"])
    assert_equals_sklearn(metrics, y_true, y_pred)
    assert metrics["per_class"]["eel"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["accuracy"] == pytest.approx(0.6)
    # A class absent from the test split still has its row, with support 0.
    metrics = compute_metrics(["a", "b"], ["a", "a"], ["a", "b", "c"])
    assert metrics["per_class"]["c"]["support"] == 0
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0 + 0) / 3)


def test_labels_outside_the_classes_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"true label\(s\) \['zebra'\]"):
        compute_metrics(["zebra"], ["cat"], ["cat", "dog"])
    with pytest.raises(ValueError, match="no test images"):
        compute_metrics([], [], ["cat", "dog"])


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classifier folder, shared: the step only reads it."""
    return make_classifier(tmp_path_factory.mktemp("evaluate") / "model")


@pytest.fixture()
def inputs(classifier: Path, tmp_path: Path) -> tuple[Path, Path]:
    return classifier, make_data(tmp_path / "data")


def test_the_step_writes_metrics_report_and_confusion_matrix(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    model, data = inputs
    out = tmp_path / "report"
    result = run_evaluate(
        model_dir=model,
        data_dir=data,
        output_dir=out,
        min_macro_f1=0.5,
        model_name="image-classifier",
        register=False,
    )
    y_true, y_pred = expected_test_labels()
    metrics = json.loads((out / "metrics.json").read_text())
    assert_equals_sklearn(metrics, y_true, y_pred)
    assert metrics["num_images"] == 9 and metrics["classes"] == CLASSES
    assert 0.5 < metrics["macro_f1"] < 1.0  # two of nine test images are mislabelled
    assert metrics["gate"] == {"min_macro_f1": 0.5, "macro_f1": metrics["macro_f1"], "passed": True}
    assert result["registered"] is None and not (out / "registered_model.json").exists()

    table = pd.read_csv(out / "classification_report.csv")
    assert list(table.columns) == ["class", "precision", "recall", "f1-score", "support"]
    assert list(table["class"]) == [*CLASSES, "accuracy", "macro avg", "weighted avg"]
    assert table.set_index("class").loc["accuracy", "f1-score"] == pytest.approx(7 / 9)

    predictions = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert list(predictions["predicted"]) == y_pred

    png = (out / "confusion_matrix.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 2000

    report = (out / "report.md").read_text()
    assert "| class | precision | recall | F1 | support |" in report
    red = metrics["per_class"]["red"]
    assert f"| red | {red['precision']:.4f} | {red['recall']:.4f} | {red['f1']:.4f} | 3 |" in report
    assert f"| **macro avg** | {metrics['macro_avg']['precision']:.4f}" in report
    assert f"Accuracy: **{7 / 9:.4f}**" in report
    assert "PASSED: test macro-F1" in report and "registration disabled" in report
    assert json.dumps(FILTER["sortout"]) in report  # the data's filter
    assert "models:/moco-backbone/7" in report  # the model's lineage
    assert "Comparison with the baseline" not in report


SEED_TITLE = "random init, frozen, head only (the seed's baseline)"
SCRATCH_TITLE = "from scratch, two-stage (supervised)"


def write_baseline(folder: Path, predicted: list[str], mode: str) -> dict:
    """An evaluate output folder (its metrics.json) of a random-init baseline."""
    folder.mkdir()
    y_true, _ = expected_test_labels()
    metrics = compute_metrics(y_true, predicted, CLASSES)
    lineage = {"lineage": {"backbone": {"source": "torchvision:resnet18:small"}, "mode": mode}}
    (folder / "metrics.json").write_text(
        json.dumps({**metrics, "model": lineage, "registered": None})
    )
    return metrics


def test_the_report_compares_with_a_baseline(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    model, data = inputs
    baseline = tmp_path / "baseline"
    y_true, _ = expected_test_labels()
    baseline_metrics = write_baseline(baseline, ["red"] * len(y_true), "head")

    out = tmp_path / "report"
    run_evaluate(
        model_dir=model,
        data_dir=data,
        output_dir=out,
        min_macro_f1=0.5,
        model_name="image-classifier",
        baseline_dir=baseline,
        register=False,
    )
    ours = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert "## Comparison with the baseline\n" in report
    assert f"- {SEED_TITLE}: `{baseline}` (backbone `torchvision:resnet18:small`, mode `head`)" in (
        report
    )
    assert f"- MoCo classifier: `{model}` (backbone `moco-backbone@latest`)" in report
    assert (
        f"| metric | MoCo classifier | {SEED_TITLE} | difference (MoCo classifier − seed's "
        "baseline) |\n|---|---:|---:|---:|\n" in report
    )
    assert SCRATCH_TITLE not in report  # a column only for the baselines given
    for label in CLASSES:
        a, b = ours["per_class"][label]["f1"], baseline_metrics["per_class"][label]["f1"]
        assert f"| F1 {label} | {a:.4f} | {b:.4f} | {a - b:+.4f} |" in report
    a, b = ours["macro_f1"], baseline_metrics["macro_f1"]
    assert f"| **macro F1** | {a:.4f} | {b:.4f} | {a - b:+.4f} |" in report
    a, b = ours["accuracy"], baseline_metrics["accuracy"]
    assert f"| **accuracy** | {a:.4f} | {b:.4f} | {a - b:+.4f} |" in report
    assert ours["baseline"]["macro_f1"] == baseline_metrics["macro_f1"]
    assert ours["baseline"]["dir"] == str(baseline) and ours["baseline_scratch"] is None

    with pytest.raises(ValueError, match="not an evaluate output folder"):
        run_evaluate(
            model_dir=model,
            data_dir=data,
            output_dir=tmp_path / "again",
            baseline_dir=tmp_path / "nothing",
            register=False,
        )


def test_the_report_puts_the_model_beside_both_baselines_in_one_table(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    """full: the MoCo classifier, the seed's baseline and the one trained from scratch."""
    model, data = inputs
    y_true, y_pred = expected_test_labels()
    seed = write_baseline(tmp_path / "seed", ["red"] * len(y_true), "head")
    # The scratch baseline gets one test image more wrong than the model.
    right = next(i for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True)) if t == p)
    scratch_pred = list(y_pred)
    scratch_pred[right] = next(c for c in CLASSES if c != y_true[right])
    scratch = write_baseline(tmp_path / "scratch", scratch_pred, "two_stage")

    out = tmp_path / "report"
    run_evaluate(
        model_dir=model,
        data_dir=data,
        output_dir=out,
        baseline_dir=tmp_path / "seed",
        baseline_scratch_dir=tmp_path / "scratch",
        register=False,
    )
    ours = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert report.count("## Comparison") == 1 and "## Comparison with the baselines\n" in report
    assert f"- {SEED_TITLE}: `{tmp_path / 'seed'}` (" in report
    assert f"- {SCRATCH_TITLE}: `{tmp_path / 'scratch'}` (" in report
    assert "mode `two_stage`" in report
    header = (
        f"| metric | MoCo classifier | {SEED_TITLE} | difference (MoCo classifier − seed's "
        f"baseline) | {SCRATCH_TITLE} | difference (MoCo classifier − from scratch) |"
    )
    assert f"{header}\n|---|---:|---:|---:|---:|---:|\n" in report

    def row(title: str, a: float, b: float, c: float) -> str:
        return f"| {title} | {a:.4f} | {b:.4f} | {a - b:+.4f} | {c:.4f} | {a - c:+.4f} |"

    for label in CLASSES:
        f1 = [m["per_class"][label]["f1"] for m in (ours, seed, scratch)]
        assert row(f"F1 {label}", *f1) in report, label
    for title, key in (("**macro F1**", "macro_f1"), ("**accuracy**", "accuracy")):
        assert row(title, ours[key], seed[key], scratch[key]) in report, key
    assert ours["accuracy"] - scratch["accuracy"] == pytest.approx(1 / 9)
    assert ours["accuracy"] - seed["accuracy"] > 0

    # metrics.json keeps its keys; each baseline's headline numbers sit under its input's name.
    assert ours["baseline"] == {
        "dir": str(tmp_path / "seed"),
        "macro_f1": seed["macro_f1"],
        "weighted_f1": seed["weighted_f1"],
        "accuracy": seed["accuracy"],
    }
    assert ours["baseline_scratch"]["dir"] == str(tmp_path / "scratch")
    assert ours["baseline_scratch"]["accuracy"] == scratch["accuracy"]

    with pytest.raises(ValueError, match="not an evaluate output folder"):
        run_evaluate(
            model_dir=model,
            data_dir=data,
            output_dir=tmp_path / "again",
            baseline_dir=tmp_path / "seed",
            baseline_scratch_dir=tmp_path / "nothing",
            register=False,
        )


def test_an_unreadable_test_image_is_skipped_and_reported(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    model, data = inputs
    write_corrupt(data / "images" / "t0.png")
    result = run_evaluate(
        model_dir=model, data_dir=data, output_dir=tmp_path / "out", register=False
    )
    assert result["metrics"]["num_images"] == 8
    assert [s["id"] for s in result["metrics"]["skipped"]] == ["t0"]
    assert "skipped (unreadable): 1" in (tmp_path / "out" / "report.md").read_text()


def test_the_gate_decides_the_candidate_alias(tmp_path: Path, inputs: tuple[Path, Path]) -> None:
    model, data = inputs
    with tracking_store(tmp_path):
        below = run_evaluate(
            model_dir=model,
            data_dir=data,
            output_dir=tmp_path / "below",
            min_macro_f1=0.9,
            model_name="image-classifier",
        )
        client = MlflowClient()
        assert below["registered"]["version"] == "1" and below["registered"]["alias"] is None
        assert client.get_registered_model("image-classifier").aliases == {}
        report = (tmp_path / "below" / "report.md").read_text()
        assert "NOT PASSED: test macro-F1" in report
        assert "version 1 registered WITHOUT the `candidate` alias" in report

        above = run_evaluate(
            model_dir=model,
            data_dir=data,
            output_dir=tmp_path / "above",
            min_macro_f1=0.5,
            model_name="image-classifier",
        )
        registered = json.loads((tmp_path / "above" / "registered_model.json").read_text())
        assert registered == above["registered"]
        assert registered["version"] == "2" and registered["alias"] == "candidate"
        assert registered["uri"] == "models:/image-classifier/2"
        assert (
            str(client.get_model_version_by_alias("image-classifier", "candidate").version) == "2"
        )
        assert (
            "alias `candidate` set on `image-classifier` version 2"
            in (tmp_path / "above" / "report.md").read_text()
        )

        tags = client.get_model_version("image-classifier", "2").tags
        metrics = above["metrics"]
        assert float(tags["test.macro_f1"]) == pytest.approx(metrics["macro_f1"], abs=1e-6)
        assert float(tags["test.accuracy"]) == pytest.approx(metrics["accuracy"], abs=1e-6)
        assert tags["backbone.name"] == "moco-backbone" and tags["backbone.version"] == "7"
        assert json.loads(tags["data.filter"]) == FILTER
        assert json.loads(tags["data.split_counts"]) == {"test": 9, "train": 6, "val": 3}
        assert json.loads(tags["lineage.num_images"]) == {"test": 9, "train": 6, "val": 3}
        assert tags["gate.passed"] == "true" and tags["gate.min_macro_f1"] == "0.5"

        run = client.get_run(registered["run_id"])
        assert run.data.tags["sslpipe.step"] == "evaluate"
        assert run.data.metrics["test_macro_f1"] == pytest.approx(metrics["macro_f1"])
        assert run.data.metrics["test_f1.red"] == pytest.approx(metrics["per_class"]["red"]["f1"])
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert "evaluation/report.md" in logged and "evaluation/confusion_matrix.png" in logged


def test_an_invalid_model_name_fails_before_any_work(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    model, data = inputs
    with pytest.raises(ValueError, match="not a valid registered model name"):
        run_evaluate(model_dir=model, data_dir=data, output_dir=tmp_path / "o", model_name="a b")


# --------------------------------------------------------------------------- the component


def test_the_component_loads_with_azure_ml_and_mirrors_the_config() -> None:
    component = load_component(source=SPEC)
    assert component.name == "sslpipe_evaluate"
    spec = load_spec(SPEC)
    inputs = spec["inputs"]
    assert set(inputs) == {
        "model",
        "data",
        "baseline",
        "baseline_scratch",
        "min_macro_f1",
        "model_name",
        "register",
    }
    assert set(component.inputs) == set(inputs) and set(component.outputs) == {"report"}
    for name in ("baseline", "baseline_scratch"):
        assert inputs[name]["optional"] is True and inputs[name]["type"] == "uri_folder"
        assert component.inputs[name].optional is True
    for name, field in EvaluateConfig.model_fields.items():
        assert inputs[name]["default"] == field.default, name
    assert inputs["register"] == {**inputs["register"], "type": "boolean", "default": True}
    assert "$[[--baseline ${{inputs.baseline}}]]" in spec["command"]
    assert "$[[--baseline_scratch ${{inputs.baseline_scratch}}]]" in spec["command"]


def _rendered(with_baseline: bool) -> list[str]:
    command = load_spec(SPEC)["command"]
    command = re.sub(r"\$\[\[(.*?)\]\]", lambda m: m.group(1) if with_baseline else "", command)
    values = {"min_macro_f1": "0.5", "model_name": "image-classifier", "register": "True"}
    command = re.sub(
        r"\$\{\{(inputs|outputs)\.(\w+)\}\}",
        lambda m: values.get(m.group(2), f"/mnt/{m.group(2)}"),
        command,
    )
    return shlex.split(command)[3:]


def test_the_parser_accepts_the_rendered_command_with_and_without_baseline() -> None:
    parser = build_parser(load_spec(SPEC))
    args = vars(parser.parse_args(_rendered(with_baseline=False)))
    assert args["baseline"] is None and args["baseline_scratch"] is None
    assert args["register"] is True
    assert args["report"] == Path("/mnt/report") and args["min_macro_f1"] == 0.5
    args = vars(parser.parse_args(_rendered(with_baseline=True)))
    assert args["baseline"] == Path("/mnt/baseline")
    assert args["baseline_scratch"] == Path("/mnt/baseline_scratch")


def test_the_entry_point_runs_the_step(
    tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from components.evaluate.main import main

    model, data = inputs
    argv = ["--model", str(model), "--data", str(data), "--report", str(tmp_path / "out")]
    run_component(SPEC, main, [*argv, "--register", "False", "--min_macro_f1", "0.9"])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["gate"]["min_macro_f1"] == 0.9 and metrics["gate"]["passed"] is False
    assert metrics["registered"] is None

    with pytest.raises(SystemExit) as exited:  # a bad input is one line and exit code 1
        run_component(SPEC, main, [*argv, "--register", "false", "--data", str(tmp_path)])
    assert exited.value.code == 1
    assert "error: sslpipe_evaluate:" in capsys.readouterr().err


def test_a_skipped_training_is_reported_and_nothing_is_registered(tmp_path: Path) -> None:
    decision = GuardDecision(
        True,
        "data d1 and setup s1 unchanged since models:/image-classifier/4",
        "d1",
        "s1",
        {"name": "image-classifier", "version": "4", "uri": "models:/image-classifier/4"},
    )
    write_skipped(tmp_path / "model", decision, step="classifier_train")
    with tracking_store(tmp_path) as uri:
        result = run_evaluate(
            model_dir=tmp_path / "model",
            data_dir=make_data(tmp_path / "data"),
            output_dir=tmp_path / "report",
        )
        assert MlflowClient(uri).search_registered_models() == []
    assert result["registered"] is None and result["metrics"] is None
    assert "unchanged since models:/image-classifier/4" in result["skipped"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Training skipped" in report and "`models:/image-classifier/4` stays" in report
    record = json.loads((tmp_path / "report" / "skipped.json").read_text())
    assert record["data_fingerprint"] == "d1"
    assert not (tmp_path / "report" / "registered_model.json").exists()


# The report's modules with `import mlflow` (and the registry) failing: a machine without MLflow.
REPORT_WITHOUT_MLFLOW = without_packages("mlflow") + """
import json, sys
from pathlib import Path

from sslpipe.models.evaluation.metrics import compute_metrics, quality_gate
from sslpipe.models.evaluation.report import plot_confusion_matrix, render_report

metrics = compute_metrics(["cat", "dog", "dog"], ["cat", "dog", "cat"], ["cat", "dog"])
gate = quality_gate(metrics, 0.5)
data = {"dir": "data", "split_counts": {"test": 3}, "skipped": []}
model = {"dir": "model", "backbone": {"name": "resnet18"}, "image_size": 32, "lineage": {}}
report = render_report(metrics=metrics, gate=gate, registered=None, data=data, model=model)
plot_confusion_matrix(Path(sys.argv[1]), metrics["confusion_matrix"], metrics["classes"])
print(json.dumps({
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] == "mlflow"
                     or m in ("sslpipe.models.registry", "sslpipe.models.training.tracking")),
    "report": report,
}))
"""


def test_the_report_renders_without_mlflow_or_a_registry(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", REPORT_WITHOUT_MLFLOW, str(tmp_path / "matrix.png")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert "registration disabled" in result["report"]
    assert "| **macro avg** |" in result["report"]
    assert (tmp_path / "matrix.png").read_bytes().startswith(PNG_MAGIC)
