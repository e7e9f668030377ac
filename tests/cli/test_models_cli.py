"""``python -m sslpipe``: promote, predict and embed against a real local registry."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from sslpipe.cli.models import main
from sslpipe.models.registry import (
    configure_tracking,
    register_backbone,
    register_classifier,
    resolve_version,
    set_alias,
)
from tests.classifier_testkit import (
    CLASSES,
    image_folder,
    make_backbone,
    make_classifier,
    tracking_store,
    write_corrupt,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A registry with image-classifier version 1 (@candidate) and moco-backbone version 1."""
    root = tmp_path_factory.mktemp("cli")
    with tracking_store(root) as uri:
        configure_tracking()
        with mlflow.start_run(run_name="fixture"):
            register_classifier(
                make_classifier(root / "model"), name="image-classifier", tags={"t": "1"}
            )
            register_backbone(make_backbone(root / "backbone"), name="moco-backbone", tags={})
        set_alias("image-classifier", 1, "candidate")
        yield uri, image_folder(root / "images")


def sslpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sslpipe", *args],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_writes_a_csv_with_an_error_row_for_the_corrupt_file(
    store: tuple[str, Path], tmp_path: Path
) -> None:
    uri, images = store
    done = sslpipe(
        "--tracking-uri",
        uri,
        "predict",
        "image-classifier@candidate",
        str(images),
        "--output",
        "out/predictions.csv",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "label", "confidence", "probabilities", "error"]
    rows = {r.path: r for r in table.itertuples()}
    assert set(rows) == {"a_red.png", "b_red.png", "d_blue.png", "e_broken.jpg", "sub/c_green.png"}
    for path, label in (("a_red.png", "red"), ("sub/c_green.png", "green"), ("d_blue.png", "blue")):
        row = rows[path]
        assert row.label == label and row.error == ""
        probabilities = json.loads(row.probabilities)
        assert list(probabilities) == CLASSES
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert float(row.confidence) == pytest.approx(probabilities[label])
    broken = rows["e_broken.jpg"]
    assert broken.label == "" and broken.probabilities == "" and broken.error
    assert "e_broken.jpg" in done.stderr and "predicted 4 of 5 images" in done.stderr


def test_embed_writes_paths_and_an_n_by_d_float32_array(
    store: tuple[str, Path], tmp_path: Path
) -> None:
    uri, images = store
    output = tmp_path / "embeddings.npz"
    done = sslpipe(
        "embed",
        "moco-backbone",
        str(images),
        "--output",
        str(output),
        "--tracking-uri",
        uri,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(output) as npz:
        paths, embeddings = list(npz["paths"]), npz["embeddings"]
    assert paths == ["a_red.png", "b_red.png", "d_blue.png", "sub/c_green.png"]
    assert embeddings.shape == (4, 512) and embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    similarity = embeddings @ embeddings.T  # the two red images are each other's nearest
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 3])
    assert "e_broken.jpg" in done.stderr


def test_promote_sets_the_alias(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["promote", "image-classifier@candidate", "--alias", "production"]) == 0
    assert capsys.readouterr().out.strip() == (
        "models:/image-classifier@production -> image-classifier version 1"
    )
    assert resolve_version("image-classifier@production") == ("image-classifier", "1")


def test_an_unknown_alias_is_one_error_line_and_exit_code_2(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["predict", "image-classifier@nope", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: registered model 'image-classifier' has no alias 'nope'; its aliases are "
        "@candidate (version 1)"
    )
    assert err.count("\n") == 1
    assert main(["promote", "ghost"]) == 2
    assert "no registered model named 'ghost'" in capsys.readouterr().err


def test_a_model_of_the_wrong_kind_is_refused(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, images = store
    assert main(["embed", "image-classifier", str(images)]) == 2
    assert "is not a backbone model" in capsys.readouterr().err


def test_bad_arguments_exit_2(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["predict", "image-classifier", str(tmp_path / "missing")]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["--tracking-uri", missing, "promote", "image-classifier"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["predict", "image-classifier"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the following arguments are required: INPUT_FOLDER")
    assert err.count("\n") == 1


def test_nothing_predictable_exits_1_and_still_writes_the_csv(
    store: tuple[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_corrupt(tmp_path / "in" / "bad.jpg")
    output = tmp_path / "p.csv"
    assert main(["predict", "image-classifier", str(tmp_path / "in"), "--output", str(output)]) == 1
    assert "no image could be predicted" in capsys.readouterr().err
    table = pd.read_csv(output, keep_default_na=False)
    assert table["path"].tolist() == ["bad.jpg"] and table["error"][0]


# --- python -m sslpipe: one help for every command (issue 16, item 6) --------------------------

README = Path(__file__).resolve().parents[2] / "README.md"
EVERY_COMMAND = (
    "promote",
    "predict",
    "embed",
    "ingest",
    "install-udf",
    "sync-labels",
    "push-predictions",
)


def top_level_main(argv: list[str]) -> int:
    """``python -m sslpipe`` in this process (imported here: a module without ``main`` fails
    only the tests that need it)."""
    entry = importlib.import_module("sslpipe.__main__")
    code: int = entry.main(argv)
    return code


def test_the_help_lists_every_command_with_a_one_line_description(tmp_path: Path) -> None:
    done = sslpipe("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^ {2,}([a-z][a-z-]+) {2,}(\S.*)$", done.stdout, re.MULTILINE)
    }
    assert set(EVERY_COMMAND) <= set(listed), done.stdout
    assert all(len(listed[name]) > 20 for name in EVERY_COMMAND), listed
    assert "COMMAND --help" in done.stdout


def test_every_command_the_readme_names_is_listed_and_run_by_its_module() -> None:
    from sslpipe.cli.commands import COMMANDS

    named = set(re.findall(r"python -m sslpipe ([a-z][a-z-]+)", README.read_text()))
    assert named == set(EVERY_COMMAND) == {command.name for command in COMMANDS}
    for module in {command.module for command in COMMANDS}:
        parser = importlib.import_module(module).build_parser()
        (subcommands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        assert set(subcommands.choices) == {c.name for c in COMMANDS if c.module == module}


@pytest.mark.parametrize("name", EVERY_COMMAND)
def test_every_command_has_its_own_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from sslpipe.cli.commands import summary

    with pytest.raises(SystemExit) as exited:
        top_level_main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m sslpipe {name} ")
    assert f"\n{summary(name)}.\n" in out  # the listing's line describes the command
    assert f"examples:\n  python -m sslpipe {name} " in out


def test_an_unknown_command_is_one_line_naming_every_command(tmp_path: Path) -> None:
    done = sslpipe("promot", "image-classifier", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown command 'promot' (did you mean 'promote'?)")
    assert done.stderr.count("\n") == 1
    assert all(name in done.stderr for name in EVERY_COMMAND)
    nothing = sslpipe(cwd=tmp_path)
    assert nothing.returncode == 2
    assert nothing.stderr.startswith("error: no command given. The commands are: promote, ")


def test_tracking_uri_before_the_command_goes_where_it_applies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exited:
        top_level_main(["--tracking-uri", "sqlite:///x.db", "ingest", "--images", "."])
    assert exited.value.code == 2
    assert "--tracking-uri applies to promote, predict, embed, push-predictions, not to ingest" in (
        capsys.readouterr().err
    )
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert top_level_main(["--tracking-uri", missing, "promote", "image-classifier"]) == 2
    assert f"no MLflow store at {tmp_path / 'none.db'}" in capsys.readouterr().err
