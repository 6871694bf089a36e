"""Secrets never reach MLflow's params: pure functions, no MLflow."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.tracking import flatten
from orchestrator.tracking_redact import REDACTED, is_secret_key, redact, redact_uri


def test_keys_that_name_a_secret_are_redacted_whole_words_only():
    for key in (
        "password",
        "db_password",
        "api_key",
        "apiKey",
        "access-token",
        "secret",
        "aws_secret_access_key",
        "credentials",
        "AUTHORIZATION",
        "client.token",
    ):
        assert is_secret_key(key), key
    for key in ("tokenizer", "tokens", "keep", "monkey", "name", "max_steps", "keyword"):
        assert not is_secret_key(key), key


def test_uris_lose_their_userinfo_and_keep_the_rest():
    assert redact_uri("http://alice:s3cr3t@mlflow:5000/x?y=1") == "http://***@mlflow:5000/x?y=1"
    assert redact_uri("https://ghp_token@host/repo") == "https://***@host/repo"
    assert redact_uri("s3://bucket/a@b") == "s3://bucket/a@b"  # an @ in the path is no userinfo
    assert redact_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert redact_uri("not a uri user:pw@x") == "not a uri user:pw@x"


def test_a_config_tree_is_redacted_before_it_becomes_params():
    config = {
        "tracking": {"uri": "http://u:pw@mlflow:5000", "experiment": "e"},
        "data": {"root": "s3://bucket/data", "tokenizer": "bytes", "storage_token": "abc"},
        "extra": {"credentials": {"user": "u", "pass": "p"}, "api_key": None},
        "hosts": ["https://u:pw@a", "b"],
    }
    params = flatten(redact(config))
    assert params == {
        "tracking.uri": "http://***@mlflow:5000",
        "tracking.experiment": "e",
        "data.root": "s3://bucket/data",
        "data.tokenizer": "bytes",
        "data.storage_token": REDACTED,
        "extra.credentials": REDACTED,
        "extra.api_key": "None",  # unset stays visible as unset
        "hosts": "['https://***@a', 'b']",
    }
    assert config["data"]["storage_token"] == "abc"  # a copy: the run's config is untouched


@settings(max_examples=200, deadline=None)
@given(
    user=st.text(alphabet="abcdefXYZ019_-.", min_size=1, max_size=12),
    password=st.text(alphabet="abcdefXYZ019_-.!$~", min_size=1, max_size=20),
)
def test_no_password_in_a_uri_survives(user, password):
    uri = f"https://{user}:{password}@tracking.example:443/api"
    assert password not in redact_uri(uri).removesuffix("tracking.example:443/api")
    assert redact_uri(uri).endswith("@tracking.example:443/api")
