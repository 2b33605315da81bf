"""pytest plugin: a fake Hugging Face Hub on 127.0.0.1 and a client environment pointed at it.

Register from tests/conftest.py with ``pytest_plugins = ["tests.conftest_hub"]``.

- ``fake_hub`` (session): the running server; ``.url``, ``.hub`` (the FakeHub: seed(), set_gated(), requests...).
- ``hub_env`` (function): points huggingface_hub at it for one test, with a fresh cache, and returns ``fake_hub``.

``huggingface_hub`` reads HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HOME... once, at import, into
``huggingface_hub.constants`` (and a few modules copy them further). Setting the environment variables only helps
subprocesses and a not-yet-imported client, so ``hub_env`` also patches every captured copy, found by reading the
2.4.0 source. All patches are undone by monkeypatch after the test.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.hubserver import FakeHub

TEST_TOKEN = "hf_test_token"


@dataclass
class FakeHubHandle:
    url: str
    hub: FakeHub

    def __getattr__(self, name):  # fake_hub.seed(...), fake_hub.requests... as shortcuts for fake_hub.hub.X
        if name == "hub":  # not set yet (copy/pickle): avoid recursing
            raise AttributeError(name)
        return getattr(self.hub, name)


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory):
    hub = FakeHub(tmp_path_factory.mktemp("fake_hub"))
    url = hub.start()
    try:
        yield FakeHubHandle(url, hub)
    finally:
        hub.stop()


def _patch_client(monkeypatch, url: str, home: Path) -> None:
    """Patch the values huggingface_hub captured at import time (no-op for the ones a version lacks)."""
    import huggingface_hub.constants as C
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._http as http

    cache = str(home / "hub")
    values = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(C.HF_URL_HOSTS) | {"127.0.0.1"},
        "HF_HUB_DISABLE_XET": True,  # no Xet server here: uploads would go to .../xet-write-token and fail
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": cache,
        "HUGGINGFACE_HUB_CACHE": cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),  # a developer's stored token must never leak into a test
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in values.items():
        if hasattr(C, name):
            monkeypatch.setattr(C, name, value)
    # The module-level HfApi behind huggingface_hub.create_repo/upload_folder/... stored the endpoint in __init__.
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    # Origins to which the Authorization header may follow a redirect, computed at import.
    if hasattr(http, "_HUB_ORIGINS"):
        parts = urlsplit(url)
        monkeypatch.setattr(http, "_HUB_ORIGINS", frozenset(http._HUB_ORIGINS) | {(parts.scheme, parts.hostname,
                                                                                    parts.port)})
    # Modules that did `from ..constants import X`.
    for module, name, value in [("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", values["HF_ASSETS_CACHE"]),
                                ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", cache),
                                ("huggingface_hub.utils._git_credential", "ENDPOINT", url)]:
        if module in sys.modules and hasattr(sys.modules[module], name):
            monkeypatch.setattr(sys.modules[module], name, value)
    # fsspec caches HfFileSystem instances together with their endpoint.
    if "huggingface_hub.hf_file_system" in sys.modules:
        sys.modules["huggingface_hub.hf_file_system"].HfFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def official_repo(fake_hub, fp8_source):
    """The default SOURCE, `ideogram-ai/ideogram-4-fp8`, on the fake hub as the release is: gated, the tiny replica
    of its two backbone folders (fused FP8 per-row, index, config without quantization_config), model_index.json,
    and the parts a conversion never needs (text encoder, VAE, tokenizer). Returns (repo id, commit sha)."""
    from ideoquant import model

    files = {p.relative_to(fp8_source).as_posix(): p for p in sorted(fp8_source.rglob("*")) if p.is_file()}
    files.update({"text_encoder/config.json": '{"ideogram_fp8_weight_only": true}',
                  "text_encoder/model.safetensors": b"\0text encoder weights",
                  "vae/diffusion_pytorch_model.safetensors": b"\0vae weights",
                  "tokenizer/tokenizer.json": "{}",
                  "README.md": "---\nlicense: other\nlicense_name: ideogram-4-non-commercial\n---\n# Ideogram 4 FP8\n"})
    sha = fake_hub.hub.seed(model.DEFAULT_SOURCE, files)
    fake_hub.hub.set_gated(model.DEFAULT_SOURCE, allowed_tokens=[TEST_TOKEN])
    return model.DEFAULT_SOURCE, sha


@pytest.fixture
def hub_env(fake_hub, monkeypatch, tmp_path):
    """Client env for one test: endpoint = fake hub, Xet off, token hf_test_token, empty HF_HOME/HF_HUB_CACHE.

    Works for in-process calls (constants patched) and for subprocesses (environment variables set).
    The request log (hub.requests, hub.auth_headers) starts empty for each test; repos persist for the session,
    so use a unique repo id per test.
    """
    home = tmp_path / "hf_home"
    home.mkdir()
    env = {
        "HF_ENDPOINT": fake_hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN": TEST_TOKEN,
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        # loopback must never go through a proxy (httpx honours NO_PROXY)
        "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE",
                 "HF_ASSETS_CACHE", "HF_XET_CACHE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", env["NO_PROXY"])
    _patch_client(monkeypatch, fake_hub.url, home)
    fake_hub.hub.reset_log()
    yield fake_hub
