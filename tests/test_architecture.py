"""The house rules that code review would otherwise have to remember."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_import_cycle_and_the_library_never_imports_the_cli():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert "0 import cycles" in run.stdout
    for line in run.stdout.splitlines():
        module, _, deps = line.partition(" -> ")
        if module.startswith("genarm_core") and not module.startswith(("genarm_core.cli", "genarm_core.__main__")):
            assert "genarm_core.cli" not in deps, line


def test_no_script_edits_sys_path():
    needle = "sys.path." + "insert"  # (spelt apart so that this file passes its own check)
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("tests/*.py"), ROOT / "app.py"]:
        assert needle not in path.read_text(), path


def test_demo_functions_fit_on_a_screen():
    import ast

    for path in (ROOT / "demo").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, f"{path.name}: {node.name} is over 60 lines"


def test_app_py_only_builds_and_launches():
    text = (ROOT / "app.py").read_text()
    assert "def " not in text and "build_app().launch(" in text
