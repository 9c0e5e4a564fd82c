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


# The core's layers, lowest first: a module imports only modules of its own layer or lower ones
# (README "Layout"). A module that no layer lists fails the test, so a new one is placed on purpose.
LAYERS = [
    ["grace_qat.errors"],
    ["grace_qat.settings", "grace_qat.quantizer", "grace_qat.registry"],
    ["grace_qat.packing", "grace_qat.files", "grace_qat.kernels"],
    ["grace_qat.architectures", "grace_qat.hub", "grace_qat.llava_hf", "grace_qat.shards",
     "grace_qat.output"],
    ["grace_qat.formats", "grace_qat.targets"],          # the on-disk layouts, one module each
    ["grace_qat.checkpoint", "grace_qat.layer_names", "grace_qat.tensor_parallel"],
    ["grace_qat.detection", "grace_qat.standard", "grace_qat.convert", "grace_qat.synthetic",
     "grace_qat.engine_config"],
    ["grace_qat.vllm_server"],
    ["grace_qat.demo", "grace_qat"],                   # the package: its lazy attributes are the reader's
    ["grace_qat.cli"],
]


def _layer(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(mod == m or mod.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"{mod}: in no layer of tests/test_structure.py's LAYERS; place it there")


def test_no_lower_layer_imports_a_higher_one():
    graph = _imports()
    upward = sorted((mod, dep) for mod, deps in graph.items() for dep in deps if _layer(dep) > _layer(mod))
    assert upward == [], upward


def _constants(path: pathlib.Path):
    """String constants of a module that are compared, used as dict keys or looked up in a
    registry, with their line (docstrings, defaults and messages are not decisions)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            operands = [k for k in node.keys if k is not None]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get" and isinstance(node.func.value, ast.Name)
              and node.func.value.id in ("formats", "targets")):
            operands = node.args
        else:
            continue
        for op in operands:
            for leaf in ast.walk(op):
                if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str):
                    yield leaf.value, node.lineno


def test_a_layout_is_named_only_in_its_own_module():
    """Adding a checkpoint layout is one module plus its tests: no module outside formats/ and
    targets/ (core or adapter) branches on a format's or a target's name."""
    from grace_qat import formats, targets
    names = set(formats.names()) | set(targets.names())
    found = []
    for package in ("grace_qat", "grace_vllm", "grace_sglang"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] in (("grace_qat", "formats"), ("grace_qat", "targets")):
                continue
            found += [f"{rel}:{line}: {value!r}" for value, line in _constants(path) if value in names]
    assert found == [], found


def test_every_layout_module_registers_itself():
    """Each module of formats/ and targets/ (besides the interface and shared helpers) registers
    one layout under its own name, and the package imports it: nothing else lists them."""
    from grace_qat import formats, targets
    for package, registry, shared in ((formats, formats.all_formats(), {"base", "_qat"}),
                                      (targets, [targets.get(n) for n in targets.names()], {"base"})):
        folder = pathlib.Path(package.__file__).parent
        modules = sorted(p.stem for p in folder.glob("*.py") if p.stem not in shared | {"__init__"})
        by_module = sorted(type(item).__module__.rpartition(".")[2] for item in registry)
        assert by_module == modules, (package.__name__, by_module, modules)
