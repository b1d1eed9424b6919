"""The benchmark scripts share code through the package (``hydra_rlhf.experiments``, ``hydra_rlhf.evaluate``), not
through each other: ``python benchmarks/<name>.py`` then works from any directory with the package installed, and a
benchmark can change without breaking another."""

import ast

from conftest import ROOT


def imported_modules(node: ast.AST) -> list[str]:
    """The top-level names an import statement imports from ("" for a relative import: a sibling file)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [(node.module or "").split(".")[0] if node.level == 0 else ""]
    return []


def test_benchmarks_neither_edit_sys_path_nor_import_each_other():
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    assert scripts
    siblings = {"", "benchmarks", *(path.stem for path in scripts)}
    problems = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                problems.append(f"{path.name}:{node.lineno}: sys.path")
            problems += [f"{path.name}:{node.lineno}: imports {name or 'a sibling'}"
                         for name in imported_modules(node) if name in siblings]
    assert not problems, "benchmarks share code through hydra_rlhf, not sys.path or each other:\n" + "\n".join(problems)
