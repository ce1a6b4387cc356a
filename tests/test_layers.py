"""The three layers import downwards only, and every package the code imports is declared.

  flows/ (CLI, flows)  ->  tasks/ (Prefect tasks, keys, tracking)  ->  nlsr/ (the library)

`nlsr` imports neither `tasks`, `flows`, `prefect` nor `mlflow` (a notebook user needs no orchestration);
`tasks` does not import `flows`. Imports inside functions count too: they are read from the syntax tree, not
from what happens to be loaded. (ruff, the other half of the lint, runs in `make lint`, before the tests.)
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"nlsr": {"tasks", "flows", "prefect", "mlflow"}, "tasks": {"flows"}}


def imports(package: str) -> dict[str, set[str]]:
    """{file: top-level modules it imports} for every module of `package` (relative imports resolved)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else (node.module or "").split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_layers_import_downwards_only():
    bad = [f"{file} imports {sorted(names & FORBIDDEN[pkg])}"
           for pkg in FORBIDDEN for file, names in imports(pkg).items() if names & FORBIDDEN[pkg]]
    assert not bad, "\n".join(bad)


def test_the_contract_checker_sees_lazy_imports(tmp_path, monkeypatch):
    """The checker must fail on a violation hidden inside a function (else it could never fail)."""
    pkg = tmp_path / "nlsr"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n    from prefect import flow\n    from .x import y\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imports("nlsr") == {"nlsr/m.py": {"prefect", "nlsr"}}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_norm(re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0]) for d in project["dependencies"]}
    dists = metadata.packages_distributions()
    own = {"nlsr", "tasks", "flows"}
    missing = []
    for pkg in own:
        for file, names in imports(pkg).items():
            for name in sorted(names - own - set(sys.stdlib_module_names) - {"__future__"}):
                if not {_norm(d) for d in dists.get(name, [name])} & declared:
                    missing.append(f"{file}: {name} (distribution {dists.get(name)})")
    assert not missing, "imported but not in pyproject.toml's dependencies:\n" + "\n".join(sorted(set(missing)))
