"""What README.md and docs/*.md say of the command line, checked against its parsers: every
option a documented ``deepwatch COMMAND ...`` line (or a row of the README's command table) gives
is one the command takes, and a default written into a usage line (``[--port 8000]``) is the
parser's. In process, no command is run: well under a second."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer

from deepwatch import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def _commands() -> dict[str, Any]:
    """Every command by the words that name it (``score``, ``datasets fetch``)."""
    cli._register_optional()
    group = typer.main.get_command(cli.app)
    found: dict[str, Any] = {}
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        for sub_name, sub in (getattr(cmd, "commands", None) or {}).items():
            found[f"{name} {sub_name}"] = sub
        found[name] = cmd
    return found


def _options(cmd: Any) -> set[str]:
    names = {"--help"}
    for sub in [cmd, *(getattr(cmd, "commands", None) or {}).values()]:
        for param in sub.params:
            names.update(param.opts + param.secondary_opts)
    return names


def _command_lines(text: str, commands: dict[str, Any]) -> list[tuple[str, str]]:
    """(command, rest of its line) for each ``deepwatch COMMAND ...`` written out, a shell
    line continued with ``\\`` (or a usage line by a next one opening with ``[--``) read as
    one, up to the end of its code span or a comment."""
    text = re.sub(r"\\\n\s*", " ", text)
    text = re.sub(r"\n\s*(?=\[--)", " ", text)
    found = []
    for m in re.finditer(r"deepwatch ((?:datasets )?[a-z]+)([^`|\n#]*)", text):
        name = m.group(1)
        if name in commands:
            found.append((name, m.group(2)))
    return found


def test_every_documented_option_is_taken_by_its_command() -> None:
    commands = _commands()
    wrong = []
    seen = 0
    for doc in DOCS:
        for name, rest in _command_lines(doc.read_text(), commands):
            seen += 1
            wrong += [(doc.name, name, flag) for flag in FLAG.findall(rest)
                      if flag not in _options(commands[name])]
    assert seen >= 20  # (the pattern still finds the documented command lines)
    assert not wrong, wrong


def test_every_option_in_the_readme_command_table_is_its_commands() -> None:
    """The README's table of commands lists each one's options in its row."""
    commands = _commands()
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if re.match(r"\| `[a-z]+` \|", line)]
    assert {"train", "evaluate", "score", "report", "serve", "stream", "datasets"} <= {
        re.match(r"\| `([a-z]+)`", row).group(1) for row in rows}  # type: ignore[union-attr]
    wrong = []
    for row in rows:
        name = re.match(r"\| `([a-z]+)`", row).group(1)  # type: ignore[union-attr]
        wrong += [(name, flag) for flag in FLAG.findall(row)
                  if flag not in _options(commands[name])]
    assert not wrong, wrong


@pytest.mark.parametrize("doc", [str(d.relative_to(ROOT)) for d in DOCS])
def test_defaults_in_usage_lines_are_the_parsers(doc: str) -> None:
    """``[--flag VALUE]`` with a literal value (a number, an address) in a usage line is the
    option's default: the parser's, or where that is None (filled in later), the one its help
    names (``(default 5; ...)``)."""
    commands = _commands()
    wrong = []
    for name, rest in _command_lines((ROOT / doc).read_text(), commands):
        cmd = commands[name]
        for flag, value in re.findall(r"\[(--[a-z][\w-]*) ([0-9][\w.:]*)\]", rest):
            params = [p for p in cmd.params if flag in p.opts]
            assert params, (name, flag)
            default = params[0].default
            if default is None:  # filled in later: the default its help names
                said = re.search(r"\(default ([0-9][\w.:]*)[;)]", params[0].help or "")
                assert said, (name, flag, "no default in its help")
                default = said.group(1)
                if re.fullmatch(r"[0-9.]+", default):
                    default = float(default)
            same = (float(value) == float(default) if isinstance(default, (int, float))
                    else value == str(default))
            if not same:
                wrong.append((name, flag, value, default))
    assert not wrong, wrong
