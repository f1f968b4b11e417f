"""The documentation is tested: every Python block of README.md and DEVELOPERS.md runs (tiny
models, synthetic data), every relative link points at a file, and every `mpdcompress`
subcommand the README names exists with the flags it shows."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md"]


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


def test_every_subcommand_and_flag_the_readme_shows_exists():
    from mpdcompress.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    text = (ROOT / "README.md").read_text()
    for line in re.findall(r"mpdcompress ([a-z]+)((?: [^`|\n]*)?)", text):
        command, rest = line
        if command not in commands:
            continue  # prose ("mpdcompress is ...")
        known = {opt for action in commands[command]._actions for opt in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            assert flag in known, f"README shows `mpdcompress {command} ... {flag}`, which {command} does not take"
