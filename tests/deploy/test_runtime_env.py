"""What `unlocked submit` / `ray job submit` upload from a checkout: the code, never keys.

Matched by Ray's own exclude matcher (the one its packaging runs), on a checkout that
holds the usual places secrets end up."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray._private.runtime_env.packaging import _get_excludes

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "deploy" / "runtime_env.yaml"

SECRETS = [
    ".env",
    ".env.production",
    "deploy/.env",
    ".envrc",
    "tls/server.pem",
    "server.key",
    "certs/client.p12",
    "id_rsa",
    "id_rsa.pub",
    "keys/id_ed25519",
    ".ssh/config",
    ".aws/credentials",
    ".kube/config",
    ".netrc",
    ".git-credentials",
    ".git/config",
    "credentials.json",
    "gcp/service-account-prod.json",
    "state/mlflow-auth.db",
    "state/basic_auth.ini",
    ".venv/bin/python",
]
CODE = [
    "orchestrator/cluster.py",
    "orchestrator/listeners.py",
    "examples/pipeline.yaml",
    "deploy/runtime_env.yaml",
    "strategies/pipeline/keys.py",
    "workers/identity.py",
    "orchestrator/environment.py",
    "README.md",
]


@pytest.fixture(scope="module")
def excluded():
    excludes = yaml.safe_load(RUNTIME_ENV.read_text())["excludes"]
    matches = _get_excludes(REPO, excludes)
    return lambda relative: matches(REPO / relative)


@pytest.mark.parametrize("path", SECRETS)
def test_key_material_and_credentials_are_never_uploaded(excluded, path):
    assert excluded(path)


@pytest.mark.parametrize("path", CODE)
def test_the_code_and_configs_are_uploaded(excluded, path):
    assert not excluded(path)
