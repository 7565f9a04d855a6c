"""The user documentation (README.md, docs/, benchmarks/README.md, data/README.md) stays honest and usable:
no development-history language or paths outside the repository, a short README, links that resolve, and every
number of a results table equal to the results/ JSON it names (the convention is described in docs/reproduce.md,
section "How the numbers in these pages are checked").

A checked table is preceded by an HTML comment::

    <!-- check
    file: results/gpu_h100/{run.link}
    keys: mode, K
    target calls: j["metrics"]["eval/{mode}/k{K}/target_calls_per_list"]
    SD ms/list: 1000 * j["metrics"]["eval/{mode}/k{K}/walltime_s"]
    Recall@K SD / beam: j["metrics"]["eval/{mode}/k{K}/recall@{K}"] ; j["metrics"]["eval/beam/k{K}/recall@{K}"]
    -->

``file`` is a path from the repository root; ``{COLUMN}`` is replaced by the row's cell text in that column and
``{COLUMN.link}`` by the target of the markdown link in that cell (resolved to a path from the repository root).
Every other line maps a column (header text) to one expression per number in its cells (``;`` between them): ``j``
is the JSON file, ``["key"]`` indexes it, ``find(list, field=value, ...)`` picks the list element whose fields
match, and ``+ - * /`` combine values. A cell's number must equal the expression's value printed with as many
decimals as the cell shows; a cell whose expression gives a string must equal that string. Cells that are empty or ``-`` are not checked; a column neither mapped nor listed in
``keys`` must not hold numbers. A table with numbers and no ``check`` comment needs ``<!-- nocheck: reason -->``.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "data" / "README.md",
                    *(ROOT / "docs").glob("*.md")])
HISTORY = re.compile(
    r"\bsessions?\b|device time|timeout_s=|carry=\[|\.\./shared/SPEC"  # the project's hook
    r"|\.\./shared|/work/|\bissue'?s?\b|\blease\b|\bloan\b|device call|files_at|\$OUT\b",
    re.IGNORECASE,
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
NUMERIC_CELL = re.compile(r"^[\s\d.,/()x%*+-]*\d[\s\d.,/()x%*+-]*$")
COMMENT = re.compile(r"<!--\s*(check|nocheck|verbatim)\b(.*?)-->", re.DOTALL)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- markdown ----------------------------------------------------------------------------------------------------
def split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def cell_text(cell: str) -> str:
    """A cell as plain text: link text instead of the link, no bold/code marks."""
    return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell).replace("**", "").replace("`", "").strip()


def cell_link(cell: str, md: Path) -> str:
    match = LINK.search(cell)
    assert match, f"{rel(md)}: no link in cell {cell!r}"
    return rel((md.parent / match.group(1)).resolve())


def tables(md: Path) -> list[tuple[int, str | None, list[str], list[list[str]]]]:
    """(line number, the comment right before the table or None, header, rows) of every table in ``md``."""
    lines = md.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            start, header = i, split_row(lines[i])
            i += 2
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            before = "\n".join(lines[:start]).rstrip()
            comment = None
            if before.endswith("-->"):
                comment = before[before.rfind("<!--"):]
            out.append((start + 1, comment, header, rows))
        else:
            i += 1
    return out


# -- expressions -------------------------------------------------------------------------------------------------
BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def find(items: list[dict], **fields) -> dict:
    hits = [item for item in items if all(item.get(k) == v for k, v in fields.items())]
    assert len(hits) == 1, f"find({fields}) matched {len(hits)} elements"
    return hits[0]


def evaluate(expr: str, j: object) -> float:
    """Evaluate a check expression: ``j``, ``["key"]``, ``find(...)``, numbers and ``+ - * /`` only."""

    def ev(node: ast.AST):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Name) and node.id == "j":
            return j
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if isinstance(node, ast.Subscript):
            return ev(node.value)[ev(node.slice)]
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            return BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "find":
            assert len(node.args) == 1
            return find(ev(node.args[0]), **{kw.arg: ev(kw.value) for kw in node.keywords})
        raise ValueError(f"not allowed in a check expression: {ast.dump(node)}")

    return ev(ast.parse(expr.strip(), mode="eval"))


@lru_cache(maxsize=None)
def load_json(path: str) -> object:
    return json.loads((ROOT / path).read_text())


def parse_check(comment: str) -> tuple[str, list[str], dict[str, list[str]]]:
    body = COMMENT.search(comment).group(2)
    file, keys, columns = None, [], {}
    for line in body.strip().splitlines():
        if not line.strip():
            continue
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if name == "file":
            file = value
        elif name == "keys":
            keys = [k.strip() for k in value.split(",") if k.strip()]
        else:
            columns[name] = [e.strip() for e in value.split(" ; ")]
    assert file, "a check comment needs a file: line"
    return file, keys, columns


def substitute(template: str, header: list[str], row: list[str], md: Path) -> str:
    def one(match: re.Match) -> str:
        name = match.group(1)
        column, link = (name[:-5], True) if name.endswith(".link") else (name, False)
        assert column in header, f"{rel(md)}: placeholder {{{name}}} names no column of {header}"
        cell = row[header.index(column)]
        return cell_link(cell, md) if link else cell_text(cell)

    return re.sub(r"\{([^{}\"]+)\}", one, template)


def check_table(md: Path, line: int, comment: str, header: list[str], rows: list[list[str]]) -> int:
    """Compare every mapped cell with its JSON value; return the number of numbers checked."""
    file, keys, columns = parse_check(comment)
    where = f"{rel(md)}:{line}"
    for name in [*keys, *columns]:
        assert name in header, f"{where}: check names column {name!r}, the table has {header}"
    assert rows, f"{where}: empty table"
    checked = 0
    for row in rows:
        assert len(row) == len(header), f"{where}: row {row} has {len(row)} cells for {len(header)} columns"
        path = substitute(file, header, row, md)
        assert (ROOT / path).is_file(), f"{where}: {path} does not exist"
        j = load_json(path)
        for column, cell in zip(header, row):
            text = cell_text(cell)
            if column in columns:
                if text in ("", "-"):
                    continue
                exprs = columns[column]
                if len(exprs) == 1 and isinstance(value := evaluate(substitute(exprs[0], header, row, md), j), str):
                    assert text == value, f"{where}: {column} = {text!r} in row {row}, but {path} gives {value!r}"
                    checked += 1
                    continue
                numbers = NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))
                assert len(numbers) == len(exprs), f"{where}: cell {text!r} ({column}) has {len(numbers)} numbers, check has {len(exprs)} expressions"
                for shown, expr in zip(numbers, exprs):
                    value = evaluate(substitute(expr, header, row, md), j)
                    decimals = len(shown.split(".")[1]) if "." in shown else 0
                    expected = f"{value:.{decimals}f}"
                    assert shown == expected, f"{where}: {column} = {shown} in row {row}, but {path} gives {expected} ({expr})"
                    checked += 1
            elif column not in keys:
                assert not NUMERIC_CELL.match(text), f"{where}: column {column!r} holds the number {text!r} but is neither checked nor a key"
    return checked


# -- tests -------------------------------------------------------------------------------------------------------
def test_docs_have_no_development_history_or_outside_paths():
    bad = []
    for md in USER_DOCS:
        for number, line in enumerate(md.read_text().splitlines(), 1):
            for match in HISTORY.finditer(line):
                bad.append(f"{rel(md)}:{number}: {match.group(0)!r} in {line.strip()[:120]!r}")
    assert not bad, "\n".join(bad)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


def test_docs_links_resolve():
    missing = []
    for md in USER_DOCS:
        for target in LINK.findall(md.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{rel(md)}: {target}")
    assert not missing, "links to missing files:\n" + "\n".join(missing)


def test_docs_results_tables_match_their_json():
    checked = 0
    for md in USER_DOCS:
        for line, comment, header, rows in tables(md):
            kind = COMMENT.search(comment).group(1) if comment and COMMENT.search(comment) else None
            if kind == "check":
                checked += check_table(md, line, comment, header, rows)
            elif kind != "nocheck":
                numeric = [cell_text(c) for row in rows for c in row if NUMERIC_CELL.match(cell_text(c))]
                assert not numeric, (f"{rel(md)}:{line}: a table with numbers needs <!-- check ... --> (or "
                                     f"<!-- nocheck: reason --> for numbers no results/ file holds)")
    assert checked > 100  # the convention is in use


def test_docs_verbatim_blocks_come_from_their_file():
    """A code block preceded by ``<!-- verbatim: results/... -->`` copies lines of that file unchanged
    (trailing spaces aside)."""
    pattern = re.compile(r"<!--\s*verbatim:\s*(\S+)\s*-->\s*\n```[^\n]*\n(.*?)\n```", re.DOTALL)
    found = 0
    for md in USER_DOCS:
        for source, block in pattern.findall(md.read_text()):
            lines = {line.rstrip() for line in (ROOT / source).read_text().splitlines()}
            for line in block.splitlines():
                assert line.rstrip() in lines, f"{rel(md)}: {line!r} is not a line of {source}"
            found += 1
    assert found >= 1


def check_selftest_table(tmp_path: Path, cell: str) -> None:
    (tmp_path / "r.json").write_text(json.dumps({"metrics": {"eval/strict/k5/x": 1.2345}}))
    md = tmp_path / "t.md"
    md.write_text(f"<!-- check\nfile: {{run.link}}\nkeys: K\nx: j[\"metrics\"][\"eval/strict/k{{K}}/x\"]\n-->\n"
                  f"| run | K | x |\n|---|---|---|\n| [r](r.json) | 5 | {cell} |\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        line, comment, header, rows = tables(md)[0]
        check_table(md, line, comment, header, rows)
    finally:
        ROOT = saved
        load_json.cache_clear()


def test_check_table_catches_a_hand_edited_number(tmp_path):
    check_selftest_table(tmp_path, "1.23")
    check_selftest_table(tmp_path, "**1.2345**")  # bold is ignored; more decimals, same value
    with pytest.raises(AssertionError, match="gives 1.23"):
        check_selftest_table(tmp_path, "1.24")
