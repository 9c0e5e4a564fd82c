"""The core's structure (issue 29): no import circle, and data flows one way between the reader
and the layouts. Every import counts, function-level ones included."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports() -> dict[str, set[str]]:
    """grace_qat module -> the grace_qat modules it imports (a package means its __init__)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "grace_qat").rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                base = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                names = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()
    circles = sorted(m for m in graph if m in _reach(graph, m))
    assert circles == [], circles


def test_layouts_never_reach_the_reader_or_its_users():
    graph = _imports()
    upper = {"grace_qat", "grace_qat.checkpoint", "grace_qat.convert", "grace_qat.standard", "grace_qat.cli"}
    for mod in graph:
        if mod.startswith(("grace_qat.formats", "grace_qat.targets")):
            assert not _reach(graph, mod) & upper, (mod, _reach(graph, mod) & upper)
