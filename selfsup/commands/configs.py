"""`selfsup configs`: every config file, what it trains (its docstring's first paragraph) and the
arguments it takes after the colon (`--config FILE:variant=L/16,smoke`).

The files are read, not run: the arguments are the keywords of the file's `parse_arg(arg, ...)`
call, with their defaults.
"""

from __future__ import annotations

import ast
import os
import textwrap
from pathlib import Path

from selfsup.errors import UserError

HELP = "list the config files: what each one trains and the variants it takes"
LOCAL = True  # one process, no multi-process run to join

_USE = {"": "selfsup train --config FILE[:ARG,...]", "eval": "selfsup eval --config FILE[:ARG]"}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--dir", help="the configs folder (default: ./configs, else the one beside selfsup)"
    )


def run(args, overrides: dict[str, str]) -> int:
    if overrides:
        raise UserError(f"selfsup configs takes no overrides, got --config.{next(iter(overrides))}")
    folder = _folder(args.dir)
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for file in sorted(folder.rglob("*.py")):
        found = describe(file)
        if found is not None:
            group = file.parent.relative_to(folder).as_posix().strip(".")
            groups.setdefault(group, []).append((_shown(file), *found))
    if not groups:
        raise UserError(f"{folder} holds no config files (Python files with get_config)")
    for group, entries in sorted(groups.items()):
        print(f"{group or 'training'} configs ({_USE.get(group, 'FILE[:ARG,...]')}):")
        for name, summary, arguments in entries:
            print(f"  {name}  [{arguments}]")
            print(textwrap.fill(summary, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return 0


def describe(file: Path) -> tuple[str, str] | None:
    """(summary, arguments) of a config file, or None if it defines no `get_config`."""
    try:
        tree = ast.parse(file.read_text(), str(file))
    except SyntaxError as e:
        raise UserError(f"{file} is not valid Python ({e.msg}, line {e.lineno})") from None
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if "get_config" not in functions:
        return None
    doc = ast.get_docstring(tree) or ""
    summary = " ".join(doc.strip().split("\n\n")[0].split()) or "(no docstring)"
    options = []
    for node in ast.walk(functions["get_config"]):
        if isinstance(node, ast.Call) and _name(node.func) == "parse_arg":
            for keyword in node.keywords:
                options.append(_option(keyword))
    return summary, ", ".join(options) or "no arguments"


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _option(keyword: ast.keyword) -> str:
    """`smoke` for a flag (default False), else `name=default`."""
    try:
        default = ast.literal_eval(keyword.value)
    except ValueError:
        return f"{keyword.arg}=..."
    if default is False:
        return keyword.arg
    if isinstance(default, str):
        return f"{keyword.arg}={default or repr(default)}"
    return f"{keyword.arg}={default!r}"


def _folder(given: str | None) -> Path:
    if given:
        if not os.path.isdir(given):
            raise UserError(f"--dir {given}: no such folder; pass the configs folder")
        return Path(given)
    here = Path("configs")
    if here.is_dir():
        return here
    beside = Path(__file__).resolve().parents[2] / "configs"  # a checkout's configs/
    if beside.is_dir():
        return beside
    raise UserError("no configs folder here: run from a selfsup checkout or pass --dir DIR")


def _shown(file: Path) -> str:
    """The path as a user would type it: relative to the current folder when inside it."""
    try:
        return file.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(file)
