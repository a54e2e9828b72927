"""The floors hold: quant_core imports nothing of ours above it (checked by importing it with the rest blocked),
and the top-level folders import each other one way only (checked on every module's import statements)."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("quant_core", "kernels", "nodes", "diffusers_glue", "bench", "testbed", "cli", "cli_options")
# who may import whom (module "lowbit" itself and __main__ are the entry points, left out)
ALLOWED = {
    "quant_core": set(),
    "kernels": {"quant_core"},
    "testbed": set(),
    "nodes": {"quant_core", "testbed"},
    "diffusers_glue": {"quant_core"},
    "bench": {"quant_core", "kernels", "nodes", "testbed", "cli_options"},
    "cli": {"quant_core", "bench", "cli_options", "testbed"},
    "cli_options": {"quant_core"},
}


def test_quant_core_imports_with_everything_above_it_blocked():
    code = textwrap.dedent("""
        import importlib, importlib.abc, pkgutil, sys
        BLOCKED = ("lowbit.kernels", "lowbit.nodes", "lowbit.diffusers_glue", "lowbit.bench", "lowbit.testbed", "lowbit.cli", "tests",
                   "helpers", "comfy", "comfy_api", "comfy_extras", "comfy_kitchen", "folder_paths")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import lowbit.quant_core
        names = [m.name for m in pkgutil.walk_packages(lowbit.quant_core.__path__, "lowbit.quant_core.")]
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
        print(len(names), loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, loaded = out.stdout.strip().split(" ", 1)
    assert loaded == "[]" and int(count) > 30, out.stdout


def _imported_top_levels(path: Path) -> set:
    """Top-level folders of ours that a module imports (relative imports resolved against its package)."""
    rel = path.relative_to(REPO)
    package = list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [a.name] for a in node.names]
            elif node.module and node.module.startswith("lowbit."):
                names = [node.module.split(".")[1:]]
            else:
                continue
            for parts in names:
                if parts and parts[0] in TOP_LEVEL:
                    found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lowbit.") and alias.name.split(".")[1] in TOP_LEVEL:
                    found.add(alias.name.split(".")[1])
    return found


def _imports_tests(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if any(m.split(".")[0] in ("tests", "helpers") for m in modules):
            return True
    return False


def test_top_level_folders_import_one_way():
    violations = []
    for top in TOP_LEVEL:
        files = [REPO / f"{top}.py"] if top.startswith("cli") else sorted((REPO / top).rglob("*.py"))
        assert files, top
        for path in files:
            wrong = _imported_top_levels(path) - ALLOWED[top] - {top}
            if wrong:
                violations.append(f"{path.relative_to(REPO)} imports {sorted(wrong)}")
            if _imports_tests(path):
                violations.append(f"{path.relative_to(REPO)} imports the tests")
    assert not violations, "\n".join(violations)
    # the allowed graph itself has no cycle, so neither does the code
    for a, targets in ALLOWED.items():
        for b in targets:
            assert a not in ALLOWED[b], (a, b)
