"""The shape of the library, so that it stays readable: modules short enough to read in one sitting, functions
with at most MAX_PARAMS parameters, imports inside tinyddpm/ that point one way (no cycle, even through imports
inside functions), and no command-line parsing outside the scripts, config.py's flag builder, the standalone
`python -m tinyddpm.X` tools and tinyddpm/cli/. Each failure names the module, function or cycle."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tinyddpm")
MAX_LINES = 400
MAX_PARAMS = 8
# Where argparse's `args` may be read: the command-line package and the standalone tools' own main().
ARGS_ALLOWED = ("tinyddpm/cli/", "tinyddpm/evaluator.py", "tinyddpm/plot.py", "tinyddpm/export.py")


def modules():
    """{dotted name: (path relative to the repo, parsed tree, line count)} for every module of tinyddpm/."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)
                name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
                out[name] = (rel, ast.parse(text), text.count("\n"))
    return out


def test_no_module_is_longer_than_a_sitting():
    long = {rel: n for rel, _, n in modules().values() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_function_takes_more_than_eight_parameters():
    wide = []
    for rel, tree, _ in modules().values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                count = len(names) + bool(a.vararg) + bool(a.kwarg)
                if count > MAX_PARAMS:
                    wide.append(f"{rel}:{node.lineno} {node.name} ({count})")
    assert not wide, f"functions with more than {MAX_PARAMS} parameters: {wide}"


def imports_of(name, tree):
    """The tinyddpm modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name if name.endswith("__init__") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {target} if node.module else {f"{target}.{a.name}" for a in node.names}
            elif node.module and node.module.startswith("tinyddpm"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tinyddpm")}
    return found


def test_imports_point_one_way():
    mods = modules()

    def resolve(target):  # a name imported from a module resolves to the module itself
        while target not in mods and "." in target:
            target = target.rsplit(".", 1)[0]
        return target if target in mods else None

    graph = {m: {resolve(t) for t in imports_of(m, tree)} - {None, m} for m, (_, tree, _) in mods.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" → ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_command_line_arguments_are_read_only_by_the_command_line_layer():
    readers = []
    for rel, tree, _ in modules().values():
        if rel.startswith(ARGS_ALLOWED):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                readers.append(f"{rel}:{node.lineno} args.{node.attr}")
    assert not readers, f"library modules reading argparse's args: {readers}"


def test_the_layout_rules_can_fail(tmp_path, monkeypatch):
    """The checks above see what they look for: a long module, a wide function, a cycle and an args read."""
    pkg = tmp_path / "tinyddpm"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import f\n\ndef g(a, b, c, d, e, f, g, h, i):\n    return args.x\n" +
                              "\n" * MAX_LINES)
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", str(tmp_path))
    monkeypatch.setattr(this, "PACKAGE", str(pkg))
    for check in (test_no_module_is_longer_than_a_sitting, test_no_function_takes_more_than_eight_parameters,
                  test_imports_point_one_way, test_command_line_arguments_are_read_only_by_the_command_line_layer):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a package that breaks its rule")
