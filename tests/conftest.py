"""Shared fixtures: offline environment, a shared artifact root for built models, the tiny random Llama."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from nlsr.env import offline_defaults

offline_defaults()
# Flow tests use a private Prefect home (its own SQLite database) and the local stores, never a user's server.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="nlsr-test-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory) -> Path:
    """An artifact root shared by all xdist workers of this session (model builds are atomic, so races are safe)."""
    root = tmp_path_factory.getbasetemp().parent / "shared-runs"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def tiny_base(shared_root) -> Path:
    """The tiny random Llama folder of configs/smoke.yaml (built once per session)."""
    from nlsr.config import load_config
    from nlsr.modeling import base_folder
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    return base_folder(cfg.model, shared_root)


@pytest.fixture(scope="session")
def embedded_base() -> Path:
    """The real SmolLM2-135M-Instruct, converted once and cached (NLSR_MODEL_CACHE or ~/.cache/nlsr)."""
    from nlsr.config import ModelConfig
    from nlsr.modeling import base_folder
    root = Path(os.environ.get("NLSR_MODEL_CACHE", Path.home() / ".cache" / "nlsr"))
    return base_folder(ModelConfig(source="embedded"), root)


def pytest_runtest_setup(item):
    """Fail each grouped test when `--dist loadgroup` did not group it: the tests of a group share a Prefect server,
    a port or earlier tests' artifacts, and a split group fails at random (pytest 9.2 with pytest-xdist 3.8 split
    every group, silently). xdist marks a grouped test by appending "@group" to its node id on the worker."""
    if item.config.getoption("loadgroup", default=False) and item.get_closest_marker("xdist_group") \
            and "@" not in item.nodeid:
        pytest.fail("--dist loadgroup ignored this test's xdist_group mark (this pytest / pytest-xdist pair does not "
                    "group tests): install the versions in requirements.lock", pytrace=False)
