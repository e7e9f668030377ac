"""The Azure ML environments: pins generated from and checked against pyproject, YAMLs that load.

These tests read the committed files and never the venv's installed versions, so they give
the same answer wherever the project is installed from PyPI.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from sslpipe.execution.environments import (
    ENVIRONMENTS,
    EnvironmentSpec,
    check_environments,
    check_pins,
    generate_pins,
    project_dependencies,
    public_version,
    read_pins,
    render_requirements,
    requirements_path,
    write_pins,
)

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
SPEC_IDS = [spec.name for spec in ENVIRONMENTS]


def committed_versions(spec: EnvironmentSpec) -> dict[str, str]:
    """name -> version of each committed pin."""
    return {pin.name: str(pin.specifier).removeprefix("==") for pin in read_pins(_path(spec))}


def _path(spec: EnvironmentSpec) -> Path:
    return requirements_path(spec, root=ROOT)


def pyproject_with(tmp_path: Path, dependencies: list[str]) -> Path:
    """A pyproject.toml in tmp_path whose [project] dependencies are ``dependencies``."""
    lines = "".join(f'    "{dep}",\n' for dep in dependencies)
    path = tmp_path / "pyproject.toml"
    path.write_text(f'[project]\nname = "sslpipe"\ndependencies = [\n{lines}]\n')
    return path


def real_dependencies() -> list[str]:
    return list(tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"])


# --- the committed pins ---------------------------------------------------------------------


def test_the_committed_pins_satisfy_pyproject() -> None:
    assert check_environments(pyproject=PYPROJECT, root=ROOT) == []


@pytest.mark.parametrize("spec", ENVIRONMENTS, ids=SPEC_IDS)
def test_every_pin_is_one_exact_public_version(spec: EnvironmentSpec) -> None:
    for pin in read_pins(_path(spec)):
        (only,) = pin.specifier
        assert only.operator == "==", pin
        assert "+" not in only.version, f"{pin}: local labels are not on PyPI"


def test_both_environments_pin_the_same_versions() -> None:
    train, cpu = (committed_versions(spec) for spec in ENVIRONMENTS)
    assert train == cpu


@pytest.mark.parametrize("spec", ENVIRONMENTS, ids=SPEC_IDS)
def test_the_committed_file_is_what_pin_writes_for_those_versions(spec: EnvironmentSpec) -> None:
    versions = committed_versions(spec)
    pins = generate_pins(project_dependencies(PYPROJECT), versions.__getitem__)
    assert render_requirements(spec, pins) == _path(spec).read_text()


# --- the check finds each kind of drift -----------------------------------------------------


def test_a_narrowed_specifier_is_reported_naming_the_package(tmp_path: Path) -> None:
    numpy = committed_versions(ENVIRONMENTS[0])["numpy"]
    deps = [f"numpy>{numpy}" if dep.startswith("numpy") else dep for dep in real_dependencies()]
    drifts = check_environments(pyproject=pyproject_with(tmp_path, deps), root=ROOT)
    assert len(drifts) == len(ENVIRONMENTS)
    for line in drifts:
        assert re.search(rf"numpy: pin {re.escape(numpy)} is outside pyproject's specifier", line)


def test_an_extra_dependency_is_reported_as_not_pinned(tmp_path: Path) -> None:
    deps = [*real_dependencies(), "rich>=13"]
    drifts = check_environments(pyproject=pyproject_with(tmp_path, deps), root=ROOT)
    assert drifts == [
        f"environments/{spec.folder}/requirements.txt: rich: in pyproject.toml but not pinned"
        for spec in ENVIRONMENTS
    ]


def test_a_pin_pyproject_does_not_name_is_reported(tmp_path: Path) -> None:
    for spec in ENVIRONMENTS:
        target = requirements_path(spec, root=tmp_path)
        target.parent.mkdir(parents=True)
        shutil.copy(_path(spec), target)
    train = requirements_path(ENVIRONMENTS[0], root=tmp_path)
    train.write_text(train.read_text() + "requests==2.32.3\n")
    drifts = check_environments(pyproject=PYPROJECT, root=tmp_path)
    assert drifts == [
        "environments/train/requirements.txt: requests: pinned, but pyproject.toml does not name it"
    ]


def test_an_unreadable_pin_line_is_one_drift(tmp_path: Path) -> None:
    for spec in ENVIRONMENTS:
        target = requirements_path(spec, root=tmp_path)
        target.parent.mkdir(parents=True)
        shutil.copy(_path(spec), target)
    cpu = requirements_path(ENVIRONMENTS[1], root=tmp_path)
    cpu.write_text(cpu.read_text() + "numpy = 2\n")
    (drift,) = check_environments(pyproject=PYPROJECT, root=tmp_path)
    assert drift.startswith(f"{cpu}:") and "cannot parse 'numpy = 2'" in drift


@pytest.mark.parametrize(
    ("pin", "problem"),
    [
        ("torch==2.9.1+cu128", "local version label (not on PyPI); pin 2.9.1"),
        ("torch>=2.4", "is not one exact version"),
        ("torch==2.3.1", "outside pyproject's specifier"),
        ("torch==2.13.0+cpu", "local version label"),
    ],
)
def test_check_pins_explains_a_bad_torch_pin(pin: str, problem: str) -> None:
    (drift,) = check_pins([Requirement("torch>=2.4,!=2.13.0+cpu")], [Requirement(pin)])
    assert drift.startswith("torch: ") and problem in drift


def test_check_pins_wants_pyprojects_extras() -> None:
    wanted = [Requirement("azure-storage-blob[aio]>=12.20,<13")]
    assert check_pins(wanted, [Requirement("azure-storage-blob[aio]==12.26.0")]) == []
    (drift,) = check_pins(wanted, [Requirement("azure-storage-blob==12.26.0")])
    assert "lacks the extras [aio]" in drift


def test_names_are_compared_canonically() -> None:
    assert check_pins([Requirement("PyYAML>=6.0")], [Requirement("pyyaml==6.0.2")]) == []


def test_the_command_exits_non_zero_with_one_line_per_drift(tmp_path: Path) -> None:
    pyproject = pyproject_with(tmp_path, [*real_dependencies(), "rich>=13"])
    result = subprocess.run(
        [sys.executable, "-m", "sslpipe.execution.environments", "check",
         "--pyproject", str(pyproject)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"environments/{spec.folder}/requirements.txt: rich: in pyproject.toml but not pinned"
        for spec in ENVIRONMENTS
    ]


# --- generation -----------------------------------------------------------------------------


def test_pins_drop_local_labels_and_keep_extras() -> None:
    assert public_version("2.9.1+cu128") == "2.9.1"
    requirements = [Requirement("torch>=2.4"), Requirement("azure-storage-blob[aio]>=12.20")]
    versions = {"torch": "2.9.1+cu128", "azure-storage-blob": "12.26.0"}
    assert generate_pins(requirements, versions.__getitem__) == [
        "torch==2.9.1",
        "azure-storage-blob[aio]==12.26.0",
    ]


def test_pin_matches_the_committed_lines_where_the_venv_has_the_committed_version() -> None:
    committed = {pin.name: str(pin) for pin in read_pins(_path(ENVIRONMENTS[0]))}
    requirements = project_dependencies(PYPROJECT)
    generated = dict(zip(committed, generate_pins(requirements, metadata.version), strict=True))
    version = {name: line.split("==")[1] for name, line in committed.items()}
    same_version = [name for name in committed if generated[name].split("==")[1] == version[name]]
    assert [generated[name] for name in same_version] == [committed[name] for name in same_version]


def test_write_pins_writes_files_that_pass_the_check(tmp_path: Path) -> None:
    versions = committed_versions(ENVIRONMENTS[0])
    written = write_pins(pyproject=PYPROJECT, root=tmp_path, version_of=versions.__getitem__)
    assert written == [requirements_path(spec, root=tmp_path) for spec in ENVIRONMENTS]
    assert check_environments(pyproject=PYPROJECT, root=tmp_path) == []


# --- the environment definitions ------------------------------------------------------------


@pytest.mark.parametrize("spec", ENVIRONMENTS, ids=SPEC_IDS)
def test_the_environment_yaml_loads_offline_and_builds_from_its_folder(
    spec: EnvironmentSpec,
) -> None:
    from azure.ai.ml import load_environment

    folder = ROOT / "environments" / spec.folder
    environment = load_environment(source=folder / "environment.yaml")
    assert environment.name == spec.name
    assert environment.image is None
    assert environment.build is not None
    # build.path is relative to the YAML's folder, as on `az ml environment create`.
    build_path = Path(environment.base_path) / str(environment.build.path)
    assert build_path.resolve() == folder.resolve()
    assert environment.build.dockerfile_path == "Dockerfile"
    assert (folder / "requirements.txt").is_file()


@pytest.mark.parametrize("spec", ENVIRONMENTS, ids=SPEC_IDS)
def test_the_dockerfile_starts_from_an_azure_ml_image_and_installs_the_pins(
    spec: EnvironmentSpec,
) -> None:
    dockerfile = (ROOT / "environments" / spec.folder / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert re.fullmatch(r"mcr\.microsoft\.com/azureml/[\w.-]+:[\w.-]+", base), base
    assert ("cuda" in base) == (spec.name == "sslpipe-train")
    assert "python=3.11" in dockerfile
    assert re.search(r"^COPY requirements\.txt ", dockerfile, re.MULTILINE)
    assert re.search(r"pip install .*-r \S*requirements\.txt", dockerfile)


def test_the_components_use_these_environments() -> None:
    names = {spec.name for spec in ENVIRONMENTS}
    used = {}
    for path in sorted((ROOT / "components").glob("*/component.yaml")):
        environment = yaml.safe_load(path.read_text())["environment"]
        match = re.fullmatch(r"azureml:([\w-]+)@latest", environment)
        assert match, f"{path.parent.name}: {environment}"
        used[path.parent.name] = match[1]
    assert set(used.values()) <= names
    assert used["moco_train"] == used["classifier_train"] == "sslpipe-train"
    assert used["data_prep"] == "sslpipe-cpu"
