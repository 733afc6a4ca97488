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
