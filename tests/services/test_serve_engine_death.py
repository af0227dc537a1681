"""When the engine process dies, in-flight requests end with a clear error, /health answers 503,
new requests get 503, and the server exits non-zero. A tiny random model with SmolLM2's
tokenizer keeps start-up fast (the text does not matter here)."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest

openai = pytest.importorskip("openai")

from tandem.shared.models.hf_folder import load_tokenizer, resolve_model  # noqa: E402
from tests.conftest import save_tiny_model  # noqa: E402
from tests.services.conftest import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("death") / "tiny-llama"
    save_tiny_model("llama", folder, vocab_size=49152, max_position_embeddings=1024)
    load_tokenizer(resolve_model(None)).save_pretrained(folder)
    return folder


def test_engine_death(tiny_with_tokenizer, tmp_path):
    srv = ServerProcess([str(tiny_with_tokenizer), "--dtype", "float32", "--max-model-len", "1024",
                         "--kv-cache-memory", "64MiB"], tmp_path / "server.log")
    try:
        srv.wait_healthy()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.completions.create(model=str(tiny_with_tokenizer), prompt="hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3

        events: list[dict] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {"prompt": "hello", "max_tokens": 1000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:") and line != "data: [DONE]":
                        events.append(json.loads(line[5:]))
                        first_chunk.set()

        engine_pid = srv.engine_pid()
        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60)
        os.kill(engine_pid, signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive()
        error = events[-1]["error"]
        assert "engine process died" in error["message"] and error["code"] == "engine_dead"

        health = httpx.get(f"{srv.url}/health", timeout=5)
        assert health.status_code == 503 and "engine" in health.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=str(tiny_with_tokenizer), prompt="hi", max_tokens=3)
        assert e.value.status_code == 503

        assert srv.proc.wait(30) != 0
        assert "engine process died" in srv.log()
    finally:
        srv.stop()


def test_engine_that_fails_to_load_exits_non_zero(tiny_with_tokenizer, tmp_path):
    srv = ServerProcess([str(tiny_with_tokenizer), "--max-model-len", "4096"], tmp_path / "server.log")
    try:
        assert srv.proc.wait(120) != 0
        log = srv.log()
        assert "the engine did not start" in log and "max_model_len=4096" in log
    finally:
        srv.stop()
