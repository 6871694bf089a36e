"""A strategy from another package: installed, announced through the `unlocked.strategies`
entry-point group, and trained by `unlocked run` like a built-in one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.errors import UserError
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[1]

PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "unlocked-echo"
        version = "0.1.0"

        [project.entry-points."unlocked.strategies"]
        echo = "unlocked_echo.config:EchoConfig"
    """,
    "unlocked_echo/__init__.py": "",
    "unlocked_echo/config.py": '''
        from typing import Literal

        from pydantic import Field

        from strategies.config import StrategyConfig
        from strategies.registry import register


        @register("unlocked_echo.driver:EchoStrategy")
        class EchoConfig(StrategyConfig):
            """Halves a number on one worker: the smallest outside strategy."""

            kind: Literal["echo"] = "echo"
            start: float = Field(default=1.0, gt=0, description="The first loss.")

            def num_workers(self) -> int:
                return 1

            def requires_data(self) -> bool:
                return False
    ''',
    "unlocked_echo/driver.py": """
        import ray

        from strategies.base import Strategy
        from unlocked_echo.config import EchoConfig


        class Halver:
            def __init__(self, start):
                self.value = start

            def step(self):
                self.value /= 2
                return self.value

            def get(self):
                return self.value

            def set(self, value):
                self.value = value


        class EchoStrategy(Strategy[EchoConfig]):
            Config = EchoConfig

            def setup(self, ctx):
                self.worker = ctx.spawn(Halver, self.config.start, role="halver", index=0)

            def step(self):
                return {"train/loss": ray.get(self.worker.step.remote())}

            def state(self):
                return {"value": ray.get(self.worker.get.remote())}

            def restore(self, state):
                ray.get(self.worker.set.remote(state["value"]))

            def headline_metrics(self):
                return ("train/loss",)
    """,
}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin built and installed into a folder of its own, as pip installs a package."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "src"
    for name, text in PLUGIN.items():
        path = source / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(site), str(source)],
        check=True,
        capture_output=True,
    )
    return site


def unlocked_cli(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    command = [sys.executable, "-m", "orchestrator", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_an_installed_strategy_is_listed_validated_and_run(plugin_site, tmp_path):
    listed = unlocked_cli(plugin_site, tmp_path, "strategies")
    assert listed.returncode == 0, listed.stderr
    assert "echo: Halves a number on one worker" in listed.stdout
    config = write_config(
        tmp_path,
        {
            "strategy": {"kind": "echo", "start": 8.0},
            "tracking": {"enabled": False},
            "checkpoint": {"root": str(tmp_path / "ckpt"), "every": 2},
            "stop": {"max_steps": 3},
        },
        name="echo.yaml",
    )
    checked = unlocked_cli(plugin_site, tmp_path, "validate", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "strategy echo with 1 worker(s)" in checked.stdout
    typo = unlocked_cli(plugin_site, tmp_path, "validate", str(config), "--set", "strategy.strat=1")
    assert typo.returncode == 2 and "strategy.strat: unknown key" in typo.stderr
    ran = unlocked_cli(plugin_site, tmp_path, "run", str(config))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "stopped at step 3 (max_steps)" in ran.stdout
    assert list((tmp_path / "ckpt" / "echo").glob("*/step-*")), "no checkpoint written"


def test_a_broken_entry_point_names_itself_and_the_fix(monkeypatch):
    from importlib.metadata import EntryPoint

    from strategies import registry

    broken = EntryPoint("ghost", "no_such_package.config:GhostConfig", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken])
    monkeypatch.setattr(registry, "_discovered", False)
    with pytest.raises(UserError, match=r"strategy 'ghost' .*failed to load.*uninstall"):
        registry.strategy_configs()
