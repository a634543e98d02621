#!/usr/bin/env python3
"""Regenerate the values table in charts/flywheel/README.md from values.yaml.

Descriptions come from `# -- ` comments above a key (helm-docs convention); defaults from the
parsed values. Leaves are scalars, lists and flow/empty maps. A test checks the table is fresh.

    python deploy/tools/gen_chart_readme.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "flywheel"
BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-]+):(?P<rest>.*)$")


def rows(values_text: str) -> list[tuple[str, str, str, str]]:
    values = yaml.safe_load(values_text)
    out: list[tuple[str, str, str, str]] = []
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    list_indent: int | None = None
    lines = values_text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and pending:
            pending.append(stripped.lstrip("#").strip())
            continue
        line_indent = len(line) - len(line.lstrip())
        if list_indent is not None and stripped and line_indent > list_indent:
            continue  # inside a block list item: part of the list's default
        list_indent = None
        if stripped.startswith("- "):
            list_indent = line_indent
            continue
        match = KEY.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [match["key"]]
        rest = match["rest"].split(" #")[0].strip()
        nxt = next((l for l in lines[i + 1:] if l.strip() and not l.strip().startswith("#")), "")
        nested_block = not rest and (len(nxt) - len(nxt.lstrip())) > indent and not nxt.strip().startswith("- ")
        if nested_block:
            stack.append((indent, match["key"]))
            if pending:  # a description on a section documents the section
                out.append((".".join(path), "object", "", " ".join(pending)))
            pending = []
            continue
        value = values
        for key in path:
            value = value[key]
        kind = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object",
                type(None): "null"}[type(value)]
        out.append((".".join(path), kind, json.dumps(value), " ".join(pending)))
        pending = []
    return out


def table(values_text: str) -> str:
    lines = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for key, kind, default, description in rows(values_text):
        default = f"`{default}`" if default else ""
        lines.append(f"| `{key}` | {kind} | {default.replace('|', '&#124;')} | {description.replace('|', '&#124;')} |")
    return "\n".join(lines)


def render(readme: str, values_text: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table(values_text)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README table is stale")
    args = parser.parse_args()
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    new = render(readme, (CHART / "values.yaml").read_text())
    if args.check:
        if new != readme:
            print("charts/flywheel/README.md is stale: run python deploy/tools/gen_chart_readme.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(new)
    print(f"wrote {readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
