"""The tracking server is asked once, in seconds, before anything starts."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from orchestrator.config import validate_mapping
from orchestrator.errors import ConfigError
from orchestrator.tracking_probe import check_reachable, check_tracking
from tests.conftest import free_port, small_config


def test_a_dead_server_is_one_message_naming_the_field_the_address_and_the_fixes():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        check_reachable(uri)
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert message.startswith(f"tracking.uri: the MLflow server at {uri} cannot be reached")
    assert "Connection refused" in message
    assert "mlflow server" in message and "tracking.enabled: false" in message


def test_a_silent_server_times_out_in_the_probe_time():
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConfigError, match="did not answer within 0.5 s"):
            check_reachable(uri, timeout_s=0.5)
        assert time.monotonic() - started < 2


class Answer(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("status", "problem"),
    [(200, None), (401, None), (503, "is failing"), (404, "no MLflow tracking server")],
)
def test_what_the_server_answers_decides(status, problem):
    handler = type("Handler", (Answer,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://user:pw@127.0.0.1:{server.server_port}"
    try:
        if problem is None:
            check_reachable(uri)
        else:
            with pytest.raises(ConfigError, match=problem) as caught:
                check_reachable(uri)
            assert "pw" not in str(caught.value)
    finally:
        server.shutdown()
        server.server_close()


def test_local_stores_and_disabled_tracking_are_not_probed(tmp_path, monkeypatch):
    check_reachable(f"sqlite:///{tmp_path / 'missing-yet.db'}")
    raw = small_config(tmp_path, tmp_path / "data")
    raw["tracking"] = {"uri": f"http://127.0.0.1:{free_port()}", "enabled": False}
    check_tracking(validate_mapping(raw))
    raw["tracking"] = {}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=r"^\$MLFLOW_TRACKING_URI \(tracking.uri is unset\)"):
        check_tracking(validate_mapping(raw))
