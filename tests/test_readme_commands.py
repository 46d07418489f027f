"""Every `histoseek …` command in the README's shell blocks parses with today's command line,
so an option renamed or a list syntax changed cannot leave the README behind."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from histoseek_cli.main import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def _shell_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # comments, whole-line or trailing
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # VAR=value prefixes
            if line.startswith("histoseek "):
                commands.append(line)
    return commands


COMMANDS = _shell_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, capsys):
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit:
        pytest.fail(f"`{command}` is refused by the command line: {capsys.readouterr().err.strip()}")
