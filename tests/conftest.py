"""Every test run gets caches of its own in a temporary folder: tests never write to the user's ~/.cache/limoe
(the built-in dataset) or matplotlib's config folder. Subprocesses inherit the environment."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _temporary_caches(tmp_path_factory):
    saved = {key: os.environ.get(key) for key in ("LIMOE_CACHE", "MPLCONFIGDIR")}
    os.environ["LIMOE_CACHE"] = str(tmp_path_factory.mktemp("limoe-cache"))
    os.environ["MPLCONFIGDIR"] = str(tmp_path_factory.mktemp("matplotlib"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

