"""The CLI's parser: --version, every default shown once in --help, data and cache dirs from platformdirs."""

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest

from renderfarm import cli

RENDERFARM = [str(Path(sys.executable).parent / "renderfarm")]


def test_version_prints_the_installed_distributions_version():
    shown = subprocess.run([*RENDERFARM, "--version"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    assert shown.stdout == f"renderfarm {importlib.metadata.version('renderfarm')}\n"
    assert re.fullmatch(r"renderfarm \d+\.\d+\.\d+\S*\n", shown.stdout)


def parsers(parser: argparse.ArgumentParser, name: str = "renderfarm"):
    """(name, parser) of the parser and each of its subcommands', nested ones too."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, subparser in action.choices.items():
                yield from parsers(subparser, f"{name} {command}")


def help_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's entry in the parser's --help, keyed by its first flag, wrapped lines joined."""
    entries, current = {}, None
    for line in parser.format_help().splitlines():
        if re.match(r"  -", line):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current is not None and line.startswith(" " * 10):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


@pytest.mark.parametrize("name_and_parser", list(parsers(cli.build_parser())), ids=lambda pair: pair[0])
def test_help_shows_each_default_once_and_never_none(name_and_parser):
    _, parser = name_and_parser
    entries = help_entries(parser)
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        entry = entries[action.option_strings[0]]
        assert "(default: None)" not in entry and entry.count("default:") <= 1, entry
        if not (action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)):
            assert f"(default: {action.default})" in entry, entry


def test_up_help_shows_the_replica_and_port_defaults():
    up = dict(parsers(cli.build_parser()))["renderfarm up"]
    entries = help_entries(up)
    assert entries["--denoisers"].endswith("denoiser replicas (default: 1)")
    assert entries["--port"].endswith("(default: 50051)") and entries["--metrics-port"].endswith("(default: 9464)")
    sweep = help_entries(dict(parsers(cli.build_parser()))["renderfarm sweep"])
    assert sweep["--seeds"].endswith("e.g. 0-3 or 0,5,9 (default: 0)")  # as typed, not [0]
    assert sweep["--width"].endswith("default: the model's native size")
    assert sweep["--priority"].endswith("shared fairly within one (default: 0)")


def test_data_and_cache_dirs_come_from_platformdirs(monkeypatch, tmp_path):
    monkeypatch.setattr(platformdirs, "user_data_dir", lambda name: str(tmp_path / "data" / name))
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda name: str(tmp_path / "cache" / name))
    parser = cli.build_parser()
    up = parser.parse_args(["up"])
    assert up.output_dir == tmp_path / "data" / "renderfarm" / "output"
    assert up.model_cache_dir == tmp_path / "cache" / "renderfarm" / "models"
    assert cli._up_config(up).state_dir == tmp_path / "data" / "renderfarm" / "state"
    assert parser.parse_args(["models", "path", "x"]).model_cache_dir == tmp_path / "cache" / "renderfarm" / "models"
