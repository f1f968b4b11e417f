"""The documentation is tested: every Python block of README.md, DEVELOPERS.md and docs/ runs
(tiny models, synthetic data), every relative link points at a file, and every `mpdcompress`
subcommand the pages name exists, prints its help, and takes the flags they show."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path, language: str) -> list[tuple[int, str]]:
    text = path.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)
    ]


PYTHON_BLOCKS = [
    pytest.param(code, id=f"{path.name}:{line}") for path in DOCS for line, code in _blocks(path, "python")
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("code", PYTHON_BLOCKS)
def test_every_python_block_runs(code, tmp_path):
    if "import transformers" in code:
        pytest.importorskip("transformers")
    # A block runs alone in a fresh process, in an empty folder, as one rank of a torchrun job.
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_relative_links_point_at_files():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"


def _shown_commands() -> list[tuple[str, str, str]]:
    """(page, subcommand, rest of the line) for every `mpdcompress <word> ...` the pages show."""
    return [
        (path.name, command, rest)
        for path in DOCS
        for command, rest in re.findall(r"mpdcompress ([a-z]+)((?: [^`|\n]*)?)", path.read_text())
    ]


def test_every_subcommand_and_flag_the_docs_show_exists(capsys):
    from mpdcompress.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    shown = [(page, command, rest) for page, command, rest in _shown_commands() if command in commands]
    assert {command for _, command, _ in shown} >= {"demo", "train", "reproduce", "bench", "pack", "inspect", "export"}
    for page, command, rest in shown:
        known = {opt for action in commands[command]._actions for opt in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            assert flag in known, f"{page} shows `mpdcompress {command} ... {flag}`, which {command} does not take"
    for command in sorted({command for _, command, _ in shown}):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, "--help"])
        assert exit_.value.code == 0
        assert f"mpdcompress {command}" in capsys.readouterr().out
