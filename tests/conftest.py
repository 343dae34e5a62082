"""Suite-wide guards: no network beyond loopback, and one converted-model cache for everyone."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Tests run from the repository root; keep a developer's .env out of them.
os.environ.setdefault("OURO_DATA_DIR", str(Path(".pytest_cache") / "ouro-data"))

MODEL_CACHE = Path(
    os.environ.get(
        "OURO_TEST_MODEL_CACHE", Path(__file__).parent.parent / ".pytest_cache" / "model"
    )
)
os.environ["OURO_TEST_MODEL_CACHE"] = str(MODEL_CACHE)

_real_connect = socket.socket.connect


def _is_local(address: Any) -> bool:
    if isinstance(address, (str, bytes)):  # unix socket
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        raise RuntimeError(f"tests may not reach the network (tried {address!r})")
    return _real_connect(self, address)


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> Any:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    yield
    socket.socket.connect = _real_connect  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Where the bundled GGUF is converted once for the whole suite."""
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    return MODEL_CACHE
