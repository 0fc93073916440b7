"""Options and helpers shared by CLI commands."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from p2pcache.paths import DATA_DIR_ENV

err_console = Console(stderr=True)
out_console = Console()

DataDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data-dir",
        envvar=DATA_DIR_ENV,
        help="Node data dir (default: ~/.local/share/p2pcache).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]

# A table narrower than this cannot show a full peer id (52 characters) next to its numbers.
WIDE = 120


def list_layout(min_width: int = WIDE) -> bool:
    """Print records as lists, not tables: on a narrow terminal a table would cut peer ids and
    multiaddrs (which users copy), and in a pipe a script wants whole lines, not boxes."""
    return not out_console.is_terminal or out_console.width < min_width


def print_line(text: str) -> None:
    """One line, never folded or cut (a long multiaddr stays one copyable line)."""
    out_console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_fields(rows: list[tuple[str, Any]], indent: str = "") -> None:
    """``key  value`` lines, keys aligned; a list value gets one line per item."""
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        items = value if isinstance(value, list) else [value]
        if not items:
            items = ["-"]
        for i, item in enumerate(items):
            label = key if i == 0 else ""
            print_line(f"{indent}{label:<{width}}  {item}")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: <message>`` on stderr as one line (never folded at the terminal width,
    brackets in it are not markup) and return the exit to raise."""
    line = Text("error:", style="bold red") + Text(f" {message}")
    err_console.print(line, soft_wrap=True, highlight=False)
    return typer.Exit(code)


def print_pairs(pairs: list[tuple[str, Any]], indent: str = "  ", width: int = 80) -> None:
    """``key value, key value`` lines no wider than ``width``, broken between pairs only."""
    line = ""
    for key, value in pairs:
        item = f"{key} {value}"
        if line and len(indent) + len(line) + 2 + len(item) > width:
            print_line(indent + line + ",")
            line = item
        else:
            line = f"{line}, {item}" if line else item
    if line:
        print_line(indent + line)
