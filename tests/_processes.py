"""Helpers of the tests that start process groups (trainers, reproductions) and signal them."""

import os
import signal
import time


def group_gone(pgid: int, timeout: float = 30.0) -> bool:
    """Whether every process of group `pgid` has exited within `timeout` s; survivors are killed (and it is False),
    so nothing outlives the test run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    return False
