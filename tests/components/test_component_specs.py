"""The Azure ML component contracts: the YAML specs, their entry points and the config models.

The specs are checked against the config models field by field so that the contract and the
configuration cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from azure.ai.ml import load_component
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sslpipe.cli.component import build_parser, load_spec, parse_bool, run_component
from sslpipe.core.config import DataPrepConfig, LabelsConfig, MocoConfig
from sslpipe.core.filters import ImageFilter, filter_argument
from sslpipe.data.labelled import parse_split
from sslpipe.models.moco.backbone import BACKBONES

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = (
    "connect_db",
    "data_prep",
    "moco_train",
    "classifier_train",
    "evaluate",
    "sync_labels",
)
PLACEHOLDER = re.compile(r"\$\{\{(inputs|outputs)\.(\w+)\}\}")
YAML_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def spec_path(name: str) -> Path:
    return REPO / "components" / name / "component.yaml"


def spec(name: str) -> dict[str, Any]:
    return load_spec(spec_path(name))


def constraint(field: FieldInfo, name: str) -> Any:
    return next((getattr(m, name) for m in field.metadata if hasattr(m, name)), None)


def assert_inputs_mirror(model: type[BaseModel], inputs: dict[str, Any]) -> None:
    """Each model field is an input of the same type, default and bounds."""
    for name, field in model.model_fields.items():
        meta = inputs[name]
        assert meta["type"] == YAML_TYPES[field.annotation], name  # type: ignore[index]
        assert meta["default"] == field.default, name
        assert type(meta["default"]) is field.annotation or (
            field.annotation is float and isinstance(meta["default"], int | float)
        ), name
        if "min" in meta:
            assert meta["min"] == constraint(field, "ge"), name
        if "max" in meta:
            assert meta["max"] == constraint(field, "le"), name


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_component_loads_with_azure_ml(name: str) -> None:
    component = load_component(source=spec_path(name))
    assert component.name == f"sslpipe_{name}"
    assert set(component.inputs) == set(spec(name)["inputs"])
    assert set(component.outputs) == set(spec(name)["outputs"])


def test_moco_train_inputs_are_exactly_the_moco_config_plus_data_resume_and_the_guard() -> None:
    inputs = spec("moco_train")["inputs"]
    assert set(inputs) == set(MocoConfig.model_fields) | {"data", "resume", "skip_unchanged"}
    assert inputs["data"]["type"] == "uri_folder"
    assert inputs["resume"]["type"] == "boolean"
    guard = inputs["skip_unchanged"]
    assert (guard["type"], guard["default"]) == ("boolean", False)
    assert_inputs_mirror(MocoConfig, inputs)


def test_the_moco_train_backbone_choices_are_the_known_backbones() -> None:
    assert tuple(spec("moco_train")["inputs"]["backbone"]["enum"]) == BACKBONES


def test_data_prep_inputs_mirror_the_data_prep_config() -> None:
    inputs = spec("data_prep")["inputs"]
    assert set(inputs) == set(DataPrepConfig.model_fields) | {"selection", "blob_uri"}
    assert_inputs_mirror(DataPrepConfig, inputs)


def test_the_connect_db_filter_default_is_the_default_filter() -> None:
    inputs = spec("connect_db")["inputs"]
    assert ImageFilter.model_validate_json(inputs["filter"]["default"]) == ImageFilter()
    assert inputs["label_level"]["default"] == 1


# connect_db input -> LabelsConfig field
LABELS_INPUTS = {
    "label_level": "level",
    "min_agreement": "min_agreement",
    "split": "split",
    "split_seed": "seed",
    "pin_sortout_testset": "pin_sortout_testset",
    "balance": "balance",
}


def test_connect_db_inputs_are_the_store_filter_mode_and_every_labels_field() -> None:
    inputs = spec("connect_db")["inputs"]
    assert set(LABELS_INPUTS.values()) == set(LabelsConfig.model_fields)
    assert set(inputs) == {"metadata_uri", "blob_uri", "filter", "mode", *LABELS_INPUTS}
    assert inputs["mode"] == {
        "type": "string",
        "default": "all",
        "enum": ["all", "labelled"],
        "description": inputs["mode"]["description"],
    }


def test_connect_db_label_defaults_and_bounds_are_the_labels_config() -> None:
    inputs = spec("connect_db")["inputs"]
    defaults = LabelsConfig()
    for name, field_name in LABELS_INPUTS.items():
        default = inputs[name]["default"]
        expected = getattr(defaults, field_name)
        assert (parse_split(default) if name == "split" else default) == expected, name
        field = LabelsConfig.model_fields[field_name]
        if "min" in inputs[name]:
            assert inputs[name]["min"] == constraint(field, "ge"), name
        if "max" in inputs[name]:
            assert inputs[name]["max"] == constraint(field, "le"), name
    kinds = {n: m["type"] for n, m in inputs.items() if n in LABELS_INPUTS}
    assert kinds == {
        "label_level": "integer",
        "min_agreement": "number",
        "split": "string",
        "split_seed": "integer",
        "pin_sortout_testset": "boolean",
        "balance": "string",
    }
    balance = LabelsConfig.model_fields["balance"].annotation
    assert tuple(inputs["balance"]["enum"]) == balance.__args__  # type: ignore[union-attr]


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_placeholder_is_declared_and_every_declaration_is_used(name: str) -> None:
    data = spec(name)
    used = PLACEHOLDER.findall(data["command"])
    for kind in ("inputs", "outputs"):
        names = [n for k, n in used if k == kind]
        assert sorted(names) == sorted(data[kind]), kind  # each exactly once
    # ... and each value follows the flag of the same name.
    pairs = re.findall(r"--(\w+) '?\$\{\{(?:inputs|outputs)\.(\w+)\}\}", data["command"])
    assert len(pairs) == len(used)
    assert all(flag == value for flag, value in pairs), pairs
    assert data["command"].startswith(f"python -m components.{name}.main ")


def sample(meta: dict[str, Any], name: str) -> str:
    kind = meta["type"]
    if kind == "boolean":
        return "True"  # Azure ML renders booleans capitalised
    if kind in ("integer", "number"):
        return str(meta.get("default", 3) if meta.get("default") is not None else 3)
    if name == "filter":
        return filter_argument(ImageFilter(include_labels=[["it's", "日本"]], limit=5))
    if kind == "string":
        return str(meta.get("default") or f"{name}-value")
    return f"/mnt/azureml/{name}"


def rendered_argv(name: str) -> list[str]:
    """The command as Azure ML would run it, placeholders filled in, without ``python -m x``."""
    data = spec(name)

    def fill(match: re.Match[str]) -> str:
        kind, key = match.groups()
        return sample(data[kind][key], key) if kind == "inputs" else f"/mnt/azureml/out/{key}"

    # Optional inputs are all bound here, so their $[[...]] groups are kept without brackets.
    command = re.sub(r"\$\[\[(.*?)\]\]", r"\1", data["command"])
    return shlex.split(PLACEHOLDER.sub(fill, command))[3:]


@pytest.mark.parametrize("name", COMPONENTS)
def test_the_generated_parser_accepts_the_rendered_command(name: str) -> None:
    data = spec(name)
    args = vars(build_parser(data).parse_args(rendered_argv(name)))
    assert set(args) == set(data["inputs"]) | set(data["outputs"])
    for key, meta in data["inputs"].items():
        expected = {"integer": int, "number": float, "boolean": bool, "string": str}.get(
            meta["type"], Path
        )
        assert isinstance(args[key], expected), key
    for key in data["outputs"]:
        assert args[key] == Path(f"/mnt/azureml/out/{key}")


def test_a_quoted_filter_reaches_connect_db_intact() -> None:
    args = vars(build_parser(spec("connect_db")).parse_args(rendered_argv("connect_db")))
    assert ImageFilter.model_validate_json(args["filter"]) == ImageFilter(
        include_labels=[["it's", "日本"]], limit=5
    )


def test_inputs_left_out_take_the_yaml_defaults() -> None:
    data = spec("moco_train")
    args = vars(build_parser(data).parse_args(["--data", "d", "--model", "m", "--checkpoint", "c"]))
    for key, meta in data["inputs"].items():
        if "default" in meta:
            assert args[key] == meta["default"], key


@pytest.mark.parametrize("name", COMPONENTS)
def test_required_inputs_and_outputs_must_be_given(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as err:
        build_parser(spec(name)).parse_args([])
    assert err.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"), [("True", True), ("false", False), (" yes ", True), ("0", False)]
)
def test_booleans_are_parsed_from_text(text: str, value: bool) -> None:
    assert parse_bool(text) is value


def test_a_boolean_flag_refuses_other_text(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser(spec("moco_train"))
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["--data", "d", "--model", "m", "--checkpoint", "c", "--small_stem", "maybe"]
        )
    assert "expected true or false, found 'maybe'" in capsys.readouterr().err


# --- entry points ------------------------------------------------------------------------------


def load_main(name: str, monkeypatch: pytest.MonkeyPatch, step: str, function: str) -> Any:
    """Import ``components/<name>/main.py`` with its step function replaced by a recorder."""
    calls: list[dict[str, Any]] = []
    stub = types.ModuleType(f"sslpipe.steps.{step}")
    setattr(stub, function, lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, f"sslpipe.steps.{step}", stub)
    module_spec = importlib.util.spec_from_file_location(
        f"_main_{name}", REPO / "components" / name / "main.py"
    )
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    module.calls = calls
    return module


def test_moco_train_main_passes_every_config_field(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_main("moco_train", monkeypatch, "moco_train", "run_moco_train")
    argv = [
        "--data",
        "d",
        "--model",
        "m",
        "--checkpoint",
        "c",
        "--epochs",
        "7",
        "--resume",
        "false",
    ]
    run_component(spec_path("moco_train"), module.main, argv)
    (call,) = module.calls
    assert call["config"] == MocoConfig(epochs=7)
    assert call["resume"] is False
    assert (call["data_dir"], call["model_dir"], call["checkpoint_dir"]) == (
        Path("d"),
        Path("m"),
        Path("c"),
    )


def test_data_prep_main_passes_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSLPIPE_IMAGE_CACHE", raising=False)
    module = load_main("data_prep", monkeypatch, "data_prep", "run_data_prep")
    argv = ["--selection", "s", "--blob_uri", "file:///b", "--data", "o", "--image_size", "36"]
    run_component(spec_path("data_prep"), module.main, argv)
    assert module.calls == [
        {
            "ids_dir": Path("s"),
            "blob_uri": "file:///b",
            "output_dir": Path("o"),
            "image_size": 36,
            "concurrency": DataPrepConfig().concurrency,
            "max_skipped_fraction": DataPrepConfig().max_skipped_fraction,
            "nodes": 1,
            "image_cache": None,  # SSLPIPE_IMAGE_CACHE unset, as on Azure ML
            "cache_max_bytes": DataPrepConfig().cache_max_mb * 2**20,
        }
    ]


def test_evaluate_main_passes_both_baselines_and_neither_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = load_main("evaluate", monkeypatch, "evaluate", "run_evaluate")
    argv = ["--model", "m", "--data", "d", "--report", "r", "--register", "False"]
    run_component(spec_path("evaluate"), module.main, argv)
    run_component(
        spec_path("evaluate"),
        module.main,
        [*argv, "--baseline", "seed", "--baseline_scratch", "scratch"],
    )
    alone, both = module.calls
    assert (alone["baseline_dir"], alone["baseline_scratch_dir"]) == (None, None)
    assert (both["baseline_dir"], both["baseline_scratch_dir"]) == (Path("seed"), Path("scratch"))
    assert both["register"] is False and both["output_dir"] == Path("r")
    inputs = spec("evaluate")["inputs"]
    for name in ("baseline", "baseline_scratch"):  # Azure ML drops the flag when unbound
        assert (inputs[name]["type"], inputs[name].get("optional")) == ("uri_folder", True)
        assert f"$[[--{name} ${{{{inputs.{name}}}}}]]" in spec("evaluate")["command"]


CONNECT_DB_ARGV = ["--metadata_uri", "sqlite:///m.db", "--blob_uri", "file:///b"]
CONNECT_DB_ARGV += ["--selection", "s"]


def test_connect_db_main_passes_the_mode_and_a_labels_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = load_main("connect_db", monkeypatch, "connect_db", "run_connect_db")
    run_component(spec_path("connect_db"), module.main, CONNECT_DB_ARGV)
    argv = [*CONNECT_DB_ARGV, "--mode", "labelled", "--label_level", "2", "--min_agreement", "0.6"]
    argv += ["--split", "0.7, 0.1, 0.2", "--split_seed", "9", "--pin_sortout_testset", "False"]
    argv += ["--balance", "class_weight", "--filter", '{"limit": 4}']
    run_component(spec_path("connect_db"), module.main, argv)
    default_call, call = module.calls
    assert default_call == {
        "metadata_uri": "sqlite:///m.db",
        "blob_uri": "file:///b",
        "image_filter": ImageFilter(),
        "mode": "all",
        "labels": LabelsConfig(),
        "output_dir": Path("s"),
    }
    assert call["mode"] == "labelled" and call["image_filter"] == ImageFilter(limit=4)
    assert call["labels"] == LabelsConfig(
        level=2,
        min_agreement=0.6,
        split=(0.7, 0.1, 0.2),
        seed=9,
        pin_sortout_testset=False,
        balance="class_weight",
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--split", "0.6,0.4"], "split '0.6,0.4': expected three comma-separated shares"),
        (["--split", "0.5,0.5,0.5"], "must be 3 non-negative shares summing to 1"),
        (["--balance", "smote"], "balance"),
        (["--min_agreement", "1.5"], "min_agreement"),
    ],
)
def test_connect_db_main_refuses_bad_label_settings_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    module = load_main("connect_db", monkeypatch, "connect_db", "run_connect_db")
    with pytest.raises(SystemExit) as err:
        run_component(spec_path("connect_db"), module.main, [*CONNECT_DB_ARGV, *flags])
    assert err.value.code == 1
    last = capsys.readouterr().err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: sslpipe_connect_db: ") and message in last
    assert module.calls == []


def test_an_expected_error_exits_1_with_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    def main(args: dict[str, Any]) -> None:
        raise ValueError("first line\n  second line")

    argv = ["--metadata_uri", "sqlite:///x", "--blob_uri", "file:///b", "--selection", "s"]
    with pytest.raises(SystemExit) as err:
        run_component(spec_path("connect_db"), main, argv)
    assert err.value.code == 1
    last = capsys.readouterr().err.rstrip("\n").splitlines()[-1]
    assert last == "error: sslpipe_connect_db: first line second line"


def connect_db(catalog: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "components.connect_db.main",
        "--metadata_uri", catalog.metadata_uri,
        "--blob_uri", catalog.blob_uri,
        "--selection", str(catalog.root / "selection"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_connect_db_runs_as_a_module_and_writes_its_outputs(tiny_catalog: Any) -> None:
    result = connect_db(tiny_catalog, "--filter", filter_argument(ImageFilter(labelled="labelled")))
    assert result.returncode == 0, result.stderr
    out = tiny_catalog.root / "selection"
    assert sorted(p.name for p in out.iterdir()) == ["containers.json", "ids.csv", "selection.json"]
    assert (out / "ids.csv").read_text().splitlines()[1:] == [
        "a.jpeg,a.jpeg,hash-a.jpeg,Even",
        "b.jpeg,b.jpeg,hash-b.jpeg,Odd",
        "f.jpeg,f.jpeg,hash-f.jpeg,",
    ]


@pytest.mark.parametrize("bad_filter", ["{not json", '{"limit": 0}'])
def test_connect_db_with_a_bad_filter_exits_1_with_a_one_line_error(
    tiny_catalog: Any, bad_filter: str
) -> None:
    result = connect_db(tiny_catalog, "--filter", bad_filter)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith("error: sslpipe_connect_db: ")
    assert "ImageFilter" in errors[0]
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    assert not (tiny_catalog.root / "selection").exists()


def test_connect_db_runs_in_labelled_mode_as_a_module(
    tiny_catalog: Any, make_document: Any
) -> None:
    tiny_catalog.add(
        *(make_document(f"even{i}.jpeg", (701, ["Even", "2"])) for i in range(5)),
        *(make_document(f"odd{i}.jpeg", (701, ["Odd", "3"])) for i in range(4)),
    )
    flags = ["--mode", "labelled", "--split", "0.5,0.25,0.25", "--split_seed", "3"]
    result = connect_db(tiny_catalog, *flags, "--balance", "class_weight")
    assert result.returncode == 0, result.stderr
    out = tiny_catalog.root / "selection"
    assert sorted(p.name for p in out.iterdir()) == [
        "containers.json",
        "ids.csv",
        "labels.json",
        "selection.json",
    ]
    lines = (out / "ids.csv").read_text().splitlines()
    assert lines[0] == "id,blob_path,file_hash,label,split,repeats"
    assert len(lines) == 1 + 11  # a and 5 Even, b and 4 Odd; c (unlabelled) and f (tie) dropped
    labels = json.loads((out / "labels.json").read_text())
    assert labels["classes"] == ["Even", "Odd"] and labels["level"] == 1
    assert set(labels["class_weights"]) == {"Even", "Odd"}
    selection = json.loads((out / "selection.json").read_text())
    assert selection["mode"] == "labelled" and selection["split_seed"] == 3
    assert selection["dropped"] == {"unlabelled": 1, "too_shallow": 0, "tie": 1, "low_agreement": 0}
    assert selection["counts_before_oversampling"]["train"] == {"Even": 3, "Odd": 3}
