"""Repository hygiene: generated protobuf modules are current, the code is ruff clean."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from protos.generate import stale_modules

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_generated_modules_match_the_protos():
    assert stale_modules() == [], "run `make protos` and commit the result"


@pytest.mark.timeout(60)
def test_ruff_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run(
        [str(ruff), "check", "--quiet", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Which packages each package may import: protos is shared by all; the client library never
# reaches into the scheduler or the server; only the launchers (scheduler) use the client.
ALLOWED = {
    "protos": {"protos"},
    "ps_server": {"protos", "ps_server"},
    "ps_worker": {"protos", "ps_worker"},
    "scheduler": {"protos", "scheduler", "ps_worker"},
}
MAX_MODULE_LINES = 520  # "modules small enough to read in one sitting"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("package", list(ALLOWED))
def test_packages_import_only_what_their_layer_allows(package):
    wrong = {
        str(p.relative_to(ROOT)): sorted(_imports(p) - ALLOWED[package])
        for p in (ROOT / package).rglob("*.py")
        if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}


@pytest.mark.timeout(60)
def test_every_package_says_what_it_is_for():
    for package in [*ALLOWED, "benchmarks"]:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and len(doc) > 60 and doc != f"{package} package.", package


@pytest.mark.timeout(60)
def test_no_module_is_too_long_to_read_in_one_sitting():
    long = {}
    for package in [*ALLOWED, "benchmarks", "tests"]:
        for p in (ROOT / package).rglob("*.py"):
            lines = len(p.read_text().splitlines())
            if lines > MAX_MODULE_LINES and not p.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                long[str(p.relative_to(ROOT))] = lines
    assert not long
