"""Thin component entry points: flags generated from the component YAML, errors as one line.

Generating the parser from ``component.yaml`` keeps the entry point's flags and the Azure ML
contract one to one by construction.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

_TYPES: dict[str, Callable[[str], Any]] = {
    "integer": int,
    "number": float,
    "string": str,
    "uri_folder": Path,
    "uri_file": Path,
    "mlflow_model": Path,
    "custom_model": Path,
}


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")


def load_spec(component_yaml: Path) -> dict[str, Any]:
    with open(component_yaml, encoding="utf-8") as f:
        spec: dict[str, Any] = yaml.safe_load(f)
    return spec


def build_parser(spec: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=spec["name"], description=spec.get("description"))
    for name, meta in (spec.get("inputs") or {}).items():
        kind = meta["type"]
        convert = parse_bool if kind == "boolean" else _TYPES[kind]
        required = not meta.get("optional", False) and "default" not in meta
        parser.add_argument(
            f"--{name}",
            type=convert,
            required=required,
            default=meta.get("default"),
            help=f"({kind}) {meta.get('description', '')}".strip(),
        )
    for name, meta in (spec.get("outputs") or {}).items():
        parser.add_argument(
            f"--{name}",
            type=Path,
            required=True,
            help=f"({meta['type']}) {meta.get('description', '')}".strip(),
        )
    return parser


def run_component(
    component_yaml: Path, main: Callable[[dict[str, Any]], Any], argv: Sequence[str] | None = None
) -> None:
    """Parse flags per ``component_yaml`` and run ``main``; expected errors exit 1 with one line."""
    spec = load_spec(component_yaml)
    args = vars(build_parser(spec).parse_args(argv))
    try:
        main(args)
    except (ValueError, RuntimeError, OSError, KeyError) as err:
        # The message is the diagnosis; the traceback still goes to the log for developers.
        traceback.print_exc(file=sys.stderr)
        # One line even when the message spans several (pydantic's ValidationError does).
        message = " ".join(str(err).split())
        print(f"error: {spec['name']}: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
