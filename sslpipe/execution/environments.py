"""Pinned requirements of the Azure ML environments, generated from and checked against pyproject.

Each Azure ML environment (``environments/<folder>/``) is built from its own folder, so each
holds its own ``requirements.txt``: one exact ``==`` pin per ``[project] dependencies`` entry
of ``pyproject.toml``, with the entry's extras. The pins are generated from the versions
installed in the project's venv and checked against pyproject's specifiers:

    python -m sslpipe.execution.environments pin     # rewrite the pins from the installed versions
    python -m sslpipe.execution.environments check   # one line per drift, exit status 1 if any

The check needs no venv and no network: it compares the committed pins with pyproject's
specifiers, so it gives the same answer on every machine.

Pins carry public versions only: a local label (``2.9.1+cu128``, ``2.9.1+cpu``) names a
build that PyPI does not serve, so ``pin`` drops it and ``check`` refuses it. For torch this
means the images install PyPI's Linux wheel, which is the CUDA build (it brings its CUDA
runtime as ``nvidia-*`` wheels; the host only needs a recent enough driver).
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from sslpipe.core.arguments import OneLineErrorParser

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS_FILE = "requirements.txt"


@dataclass(frozen=True)
class EnvironmentSpec:
    """One Azure ML environment: its registered name and its folder under ``environments/``."""

    name: str
    folder: str
    summary: str


ENVIRONMENTS: tuple[EnvironmentSpec, ...] = (
    EnvironmentSpec(
        name="sslpipe-train",
        folder="train",
        summary="GPU training image (moco_train, classifier_train); torch is PyPI's CUDA build",
    ),
    EnvironmentSpec(
        name="sslpipe-cpu",
        folder="cpu",
        summary="CPU image (connect_db, data_prep, evaluate, sync_labels)",
    ),
)


def project_dependencies(pyproject: Path) -> list[Requirement]:
    """The ``[project] dependencies`` of ``pyproject``, parsed."""
    with pyproject.open("rb") as handle:
        project = tomllib.load(handle).get("project", {})
    return [Requirement(line) for line in project.get("dependencies", [])]


def requirements_path(spec: EnvironmentSpec, *, root: Path = PROJECT_ROOT) -> Path:
    return root / "environments" / spec.folder / REQUIREMENTS_FILE


def public_version(version: str) -> str:
    """``version`` without its local label: ``2.9.1+cu128`` -> ``2.9.1``."""
    return Version(version).public


def pin_line(requirement: Requirement, version: str) -> str:
    """``name[extras]==version`` (with the requirement's marker, if any)."""
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    marker = f"; {requirement.marker}" if requirement.marker else ""
    return f"{requirement.name}{extras}=={version}{marker}"


def generate_pins(
    requirements: Iterable[Requirement], version_of: Callable[[str], str]
) -> list[str]:
    """One pin line per requirement, at ``version_of(name)`` without its local label."""
    return [pin_line(req, public_version(version_of(req.name))) for req in requirements]


def render_requirements(spec: EnvironmentSpec, pins: Sequence[str]) -> str:
    header = (
        f"# Azure ML environment {spec.name}: {spec.summary}.\n"
        "# Generated from pyproject.toml [project] dependencies and the venv's installed\n"
        "# versions by `python -m sslpipe.execution.environments pin`; checked (no venv\n"
        "# needed) by `python -m sslpipe.execution.environments check`. Do not edit by hand.\n"
    )
    return header + "".join(f"{line}\n" for line in pins)


def read_pins(path: Path) -> list[Requirement]:
    """The requirement lines of a requirements file (comments and blank lines skipped)."""
    pins = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            pins.append(Requirement(line))
        except InvalidRequirement as error:
            raise ValueError(f"{path}:{number}: cannot parse {line!r}: {error}") from None
    return pins


def _exact_version(pin: Requirement) -> str | None:
    specs = list(pin.specifier)
    if len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
        return specs[0].version
    return None


def check_pin(requirement: Requirement, pin: Requirement) -> str | None:
    """Why ``pin`` does not satisfy ``requirement`` (pyproject's entry), or None if it does."""
    exact = _exact_version(pin)
    if exact is None:
        return f"pin {pin.specifier or '(none)'} is not one exact version; expected {pin.name}==X"
    try:
        version = Version(exact)
    except InvalidVersion:
        return f"pin {exact!r} is not a valid version"
    if version.local is not None:
        return f"pin {exact} has a local version label (not on PyPI); pin {version.public}"
    if not requirement.specifier.contains(version, prereleases=True):
        return f"pin {exact} is outside pyproject's specifier {requirement.specifier}"
    missing = requirement.extras - pin.extras
    if missing:
        return f"pin lacks the extras [{','.join(sorted(missing))}] that pyproject asks for"
    return None


def check_pins(requirements: Sequence[Requirement], pins: Sequence[Requirement]) -> list[str]:
    """One message per drift between pyproject's requirements and a file's pins."""
    wanted: dict[str, Requirement] = {canonicalize_name(req.name): req for req in requirements}
    pinned: dict[str, Requirement] = {}
    drifts = []
    for pin in pins:
        key = canonicalize_name(pin.name)
        if key in pinned:
            drifts.append(f"{pin.name}: pinned twice")
        pinned[key] = pin
    for name, req in wanted.items():
        if name not in pinned:
            drifts.append(f"{req.name}: in pyproject.toml but not pinned")
        elif (problem := check_pin(req, pinned[name])) is not None:
            drifts.append(f"{req.name}: {problem}")
    drifts += [
        f"{pin.name}: pinned, but pyproject.toml does not name it"
        for name, pin in pinned.items()
        if name not in wanted
    ]
    return drifts


def check_environments(*, pyproject: Path, root: Path) -> list[str]:
    """Drifts of every environment's pins, each line prefixed with the file it is in."""
    requirements = project_dependencies(pyproject)
    drifts = []
    for spec in ENVIRONMENTS:
        path = requirements_path(spec, root=root)
        shown = path.relative_to(root) if path.is_relative_to(root) else path
        if not path.is_file():
            drifts.append(f"{shown}: missing; run python -m sslpipe.execution.environments pin")
            continue
        try:
            pins = read_pins(path)
        except ValueError as error:
            drifts.append(str(error))
            continue
        drifts += [f"{shown}: {line}" for line in check_pins(requirements, pins)]
    return drifts


def write_pins(
    *, pyproject: Path, root: Path, version_of: Callable[[str], str] = metadata.version
) -> list[Path]:
    """Write every environment's requirements file from the installed versions."""
    pins = generate_pins(project_dependencies(pyproject), version_of)
    written = []
    for spec in ENVIRONMENTS:
        path = requirements_path(spec, root=root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_requirements(spec, pins))
        written.append(path)
    return written


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="python -m sslpipe.execution.environments",
        description="Generate or check the Azure ML environments' pinned requirements.",
    )
    parser.add_argument("command", choices=["pin", "check"])
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT, help="project root")
    parser.add_argument(
        "--pyproject", type=Path, default=None, help="pyproject.toml (default: ROOT/pyproject.toml)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pyproject = args.pyproject or args.root / "pyproject.toml"
    if args.command == "pin":
        for path in write_pins(pyproject=pyproject, root=args.root):
            print(f"[environments] wrote {path}", file=sys.stderr)
        return 0
    drifts = check_environments(pyproject=pyproject, root=args.root)
    for line in drifts:
        print(line)
    if not drifts:
        print(f"[environments] pins match {pyproject}", file=sys.stderr)
    return 1 if drifts else 0


if __name__ == "__main__":
    sys.exit(main())
