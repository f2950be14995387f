"""The longest functions in src/ (`python tools/longest_functions.py [N]`): lines from `def` to the end."""

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def lengths() -> list[tuple[int, str]]:
    out = []
    for file in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{file.relative_to(SRC)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


if __name__ == "__main__":
    for n, where in lengths()[: int(sys.argv[1]) if len(sys.argv) > 1 else 10]:
        print(f"{n:4d}  {where}")
