"""The thread that moves the run's records from the on-disk buffer to MLflow.

Training only appends to the buffer; this thread alone talks to the server, so a slow or
dead server costs the thread its time, never a training step. While the server is down
it waits (0.5 s, doubling to 10 s) and tries again from the high-water mark; the first
failure and the recovery are each said once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from orchestrator.tracking_buffer import Spool, send_unsent
from orchestrator.tracking_records import RunIds, is_transient

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.5
LAST_RETRY_S = 10.0


def retry_delay(failures: int) -> float:
    """Seconds before the next try after ``failures`` failed tries in a row (>= 1)."""
    return min(FIRST_RETRY_S * 2 ** (failures - 1), LAST_RETRY_S)


class TrackingSender:
    def __init__(self, spool: Spool, client: MlflowClient, run_ids: RunIds, uri: str) -> None:
        self.spool = spool
        self.client = client
        self.run_ids = run_ids
        self.uri = uri
        self.failures = 0
        self._down_since = 0.0
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """New records are in the buffer."""
        with self._wake:
            self._wake.notify()

    def close(self, timeout_s: float) -> bool:
        """Send what is left (one more try if the server is down, so a server back by now
        still gets the final statuses) and stop; True when the buffer is empty."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout_s)
        return self.spool.empty

    def _loop(self) -> None:
        while True:
            with self._wake:
                closing = self._closing
            try:
                sent = send_unsent(self.spool, self.client, self.run_ids)
            except Exception as err:
                if not is_transient(err):
                    log.exception(
                        "sending MLflow records stopped; they stay in %s", self.spool.path
                    )
                    return
                self._down(err)
            else:
                self._up(sent)
            with self._wake:
                if closing:  # this was the try after close(): done, sent or not
                    return
                if self._closing:
                    continue
                if self.failures:  # new records do not cut a wait for the server short
                    deadline = time.monotonic() + retry_delay(self.failures)
                    while not self._closing and (left := deadline - time.monotonic()) > 0:
                        self._wake.wait(left)
                elif self.spool.empty:
                    self._wake.wait()

    def _down(self, err: BaseException) -> None:
        if self.failures == 0:
            log.warning(
                "MLflow at %s is not answering (%s); training goes on and its records are "
                "kept in %s until the server is back",
                self.uri,
                str(err).splitlines()[0][:300],
                self.spool.path,
            )
            self._down_since = time.monotonic()
        self.failures += 1

    def _up(self, sent: int) -> None:
        if self.failures:
            log.warning(
                "MLflow at %s is back after %.0f s; %d buffered records sent",
                self.uri,
                time.monotonic() - self._down_since,
                sent,
            )
        self.failures = 0
