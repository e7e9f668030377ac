"""Turning a component command into argv: placeholders, optional blocks, quoting."""

import pytest

from sslpipe.execution.commands import CommandError, format_value, resolve_command

COMMAND = (
    "python main.py --ids ${{inputs.ids}} $[[--limit ${{inputs.limit}}]] "
    "--output ${{outputs.images}}"
)


def test_placeholders_are_replaced_by_their_values() -> None:
    argv = resolve_command(
        COMMAND, {"inputs.ids": "/data/ids.csv", "inputs.limit": "5", "outputs.images": "/o"}
    )

    assert argv == ["python", "main.py", "--ids", "/data/ids.csv", "--limit", "5", "--output", "/o"]


def test_an_optional_block_is_dropped_when_its_input_is_unbound() -> None:
    argv = resolve_command(
        COMMAND, {"inputs.ids": "/data/ids.csv", "inputs.limit": None, "outputs.images": "/o"}
    )

    assert argv == ["python", "main.py", "--ids", "/data/ids.csv", "--output", "/o"]


def test_an_optional_block_is_kept_only_when_every_input_inside_is_bound() -> None:
    command = "run $[[--pair ${{inputs.a}} ${{inputs.b}}]] --end"

    assert resolve_command(command, {"inputs.a": "1"}) == ["run", "--end"]
    assert resolve_command(command, {"inputs.a": "1", "inputs.b": "2"}) == [
        "run",
        "--pair",
        "1",
        "2",
        "--end",
    ]


def test_a_value_with_spaces_and_quotes_stays_one_argument() -> None:
    tricky = """it's a "quoted" message;  with $HOME && spaces"""

    argv = resolve_command("echo --message ${{inputs.m}}", {"inputs.m": tricky})

    assert argv == ["echo", "--message", tricky]


def test_a_placeholder_inside_quotes_in_the_command_gets_the_raw_value() -> None:
    argv = resolve_command('echo "--label=${{inputs.m}}"', {"inputs.m": "a 'b' c"})

    assert argv == ["echo", "--label=a 'b' c"]


def test_a_required_placeholder_without_a_value_is_an_error() -> None:
    with pytest.raises(CommandError, match=r"uses \$\{\{inputs\.ids\}\} but it has no value"):
        resolve_command(COMMAND, {"outputs.images": "/o"})


def test_shell_operators_are_rejected_because_there_is_no_shell() -> None:
    with pytest.raises(CommandError, match="shell operators"):
        resolve_command("python a.py && python b.py", {})


def test_booleans_are_written_in_lower_case_like_azure_ml() -> None:
    assert [format_value(True), format_value(False), format_value(3), format_value(0.5)] == [
        "true",
        "false",
        "3",
        "0.5",
    ]
