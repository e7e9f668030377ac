"""Component commands as argument lists: Azure ML's placeholders filled in without a shell.

``${{inputs.x}}`` and ``${{outputs.y}}`` take their values, ``$[[...]]`` optional blocks stay
only when every input inside is bound, a leading ``python`` becomes the executor's interpreter,
and a step that asks for several processes (``distribution.process_count_per_instance``) is
wrapped in torchrun.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from sslpipe.execution.graph import OPTIONAL_BLOCK_RE, PLACEHOLDER_RE, StepSpec

_SHELL_OPERATORS = frozenset({"&&", "||", "|", ";", ">", ">>", "<", "2>", "2>&1", "&"})
_PYTHON_NAMES = frozenset({"python", "python3"})


class CommandError(ValueError):
    """A component command cannot be turned into an argument list."""


def format_value(value: Any) -> str:
    """Format an input value for the command line the way Azure ML does (``true``/``false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def resolve_command(command: str, values: Mapping[str, str | None]) -> list[str]:
    """Turn a component command into an argv list.

    Args:
        command: the component's command with ``${{inputs.x}}``, ``${{outputs.y}}`` and
            ``$[[...]]`` optional blocks.
        values: ``"inputs.x"`` / ``"outputs.y"`` to the text to put in; None (or missing)
            for an unbound optional input.

    ``$[[...]]`` blocks are kept without the brackets when every input inside is bound and
    dropped otherwise. Values are spliced in *after* the command is split with shlex, so a
    value with spaces or quotes always stays one argument and is never interpreted by a shell.

    Raises:
        CommandError: when a placeholder outside ``$[[...]]`` has no value, or the command
            uses shell operators (there is no shell to run them).
    """

    def keep_block(match: re.Match[str]) -> str:
        inner = match.group(1)
        bound = all(values.get(f"{kind}.{name}") is not None for kind, name in _refs(inner))
        return inner if bound else " "

    text = OPTIONAL_BLOCK_RE.sub(keep_block, command.replace("\\\n", " "))
    spliced: list[str] = []

    def to_token(match: re.Match[str]) -> str:
        key = f"{match.group(1)}.{match.group(2)}"
        value = values.get(key)
        if value is None:
            raise CommandError(f"the command uses ${{{{{key}}}}} but it has no value")
        spliced.append(value)
        # NUL never occurs in a command or an argument, so it cannot clash with user text.
        return f"\0{len(spliced) - 1}\0"

    text = PLACEHOLDER_RE.sub(to_token, text)
    try:
        items = shlex.split(text)
    except ValueError as exc:
        raise CommandError(f"cannot split the command {command!r}: {exc}") from None
    operators = [item for item in items if item in _SHELL_OPERATORS]
    if operators:
        raise CommandError(
            f"the command uses shell operators {operators}; the local executor runs commands "
            "without a shell, so put that logic in the component's script"
        )
    return [re.sub(r"\0(\d+)\0", lambda m: spliced[int(m.group(1))], item) for item in items]


def _refs(text: str) -> list[tuple[str, str]]:
    return [(kind, name) for kind, name in PLACEHOLDER_RE.findall(text)]


def torchrun_argv(argv: Sequence[str], processes: int) -> list[str]:
    """``python <script|-m module> args`` as ``processes`` processes under torchrun.

    Args:
        argv: a resolved command whose first item is the Python interpreter.
        processes: processes on this machine (``process_count_per_instance``), >= 1.

    Returns:
        ``[python, -m, torch.distributed.run, --standalone, --nproc_per_node=N, ...]`` followed
        by the script (or ``-m module``) and its arguments. ``--standalone`` lets torchrun pick
        a free port on localhost, so that several runs on one machine do not collide.

    Raises:
        CommandError: when the command is not ``python script ...`` or ``python -m module ...``.
    """
    if processes < 1:
        raise CommandError(f"process_count_per_instance must be >= 1, got {processes}")
    if len(argv) < 2:
        raise CommandError(f"cannot run {shlex.join(argv)!r} under torchrun: no script to run")
    target = argv[1]
    if target.startswith("-") and target != "-m":
        raise CommandError(
            f"cannot run {shlex.join(argv)!r} under torchrun: start the command with "
            "'python script.py ...' or 'python -m module ...' (no interpreter options)"
        )
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [argv[0], *launcher, *argv[1:]]


def step_argv(
    step: StepSpec,
    *,
    parameters: Mapping[str, Any],
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    python: str,
) -> list[str]:
    """The step's command with values filled in.

    Args:
        step: the step whose ``command`` is resolved.
        parameters: literal input values (formatted with :func:`format_value`).
        inputs: input paths.
        outputs: output paths.
        python: the interpreter that replaces a leading ``python`` / ``python3``.

    Raises:
        CommandError: see :func:`resolve_command`; or the step asks for several processes
            and its command does not start with ``python``.
    """
    values: dict[str, str | None] = {f"outputs.{n}": p for n, p in outputs.items()}
    values |= {f"inputs.{n}": p for n, p in inputs.items()}
    values |= {f"inputs.{n}": format_value(v) for n, v in parameters.items()}
    argv = resolve_command(step.command, values)
    is_python = bool(argv) and argv[0] in _PYTHON_NAMES
    if is_python:
        argv[0] = python
    if step.processes > 1:
        if not is_python:
            raise CommandError(
                f"step {step.name!r} asks for {step.processes} processes "
                "(distribution.process_count_per_instance), which the local executor "
                "starts with torchrun; its command must start with 'python', found "
                f"{argv[0] if argv else '(nothing)'!r}"
            )
        argv = torchrun_argv(argv, step.processes)
    return argv
