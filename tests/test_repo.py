"""Repository hygiene: generated protobuf modules are current, the code is ruff clean."""

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
