"""Functions of ``src/`` longer than a limit, in lines of code (docstring left out), as JSON.

python bench/function_lengths.py [--limit 80]
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def lengths(root: Path = SRC) -> list[dict]:
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = node.body[0]
                doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                total = node.end_lineno - node.lineno + 1
                code = total - (first.end_lineno - first.lineno + 1 if doc else 0)
                rows.append({"function": f"{path.relative_to(root)}:{node.name}",
                             "lines": total, "code_lines": code})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=80)
    args = p.parse_args()
    rows = lengths()
    over = sorted((r for r in rows if r["code_lines"] > args.limit), key=lambda r: -r["code_lines"])
    print(json.dumps({"limit": args.limit, "functions": len(rows), "over_limit": over}, indent=1))


if __name__ == "__main__":
    main()
