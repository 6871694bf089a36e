"""Reading and checking a config starts fast: it loads neither Ray nor torch (each takes
seconds to import), and no strategy's driver."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "torch", "mlflow")


def loaded_after(code: str) -> set[str]:
    """The heavy top-level packages in ``sys.modules`` after running ``code`` afresh."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split()) & set(HEAVY)


def test_importing_the_config_and_the_api_loads_neither_ray_nor_torch():
    assert loaded_after("import orchestrator.config") == set()
    assert loaded_after("import unlocked") == set()


@pytest.mark.parametrize("example", ["pipeline", "backprop", "pbt-pipeline", "eggroll-cartpole"])
def test_validating_a_config_loads_neither_ray_nor_torch(example):
    code = f"import unlocked; unlocked.load_config('examples/{example}.yaml')"
    assert loaded_after(code) == set()


def test_the_cli_help_and_validate_load_neither_ray_nor_torch():
    assert loaded_after("from orchestrator.cli import _parser; _parser()") == set()


def test_unlocked_validate_loads_neither_ray_nor_torch():
    code = "from orchestrator.cli import main; main(['validate', 'examples/pipeline.yaml'])"
    assert loaded_after(code) == set()
