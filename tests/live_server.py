"""A live OpenAI-compatible server on 127.0.0.1 (a free port) for tests, and a raw HTTP helper."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import socket
import threading
import time

from qwen2.checkpoint.loader import Pretrained
from qwen2.inference.engine import Engine, EngineConfig
from qwen2.serve import ServerConfig, create_app

API_KEY = "test-key-123"


@dataclasses.dataclass
class LiveServer:
    port: int
    engine: Engine
    api_key: str | None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def request(self, method: str, path: str, body: bytes | dict | None = None, *,
                headers: dict | None = None, key: str | None = "default") -> tuple[int, dict]:
        """Send raw bytes (or a dict as JSON); return (status, parsed JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        key = self.api_key if key == "default" else key
        if key:
            all_headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, json.loads(payload) if payload else {}


@contextlib.contextmanager
def live_server(pretrained: Pretrained, engine_config: EngineConfig = EngineConfig(), *, api_key: str | None = None,
                start_engine: bool = True, max_body_bytes: int | None = None):
    import uvicorn

    engine = Engine(pretrained.model, pretrained.tokenizer, engine_config, stop_ids=pretrained.stop_ids)
    if start_engine:
        engine.start()
    server_config = ServerConfig(model_name="tiny-qwen2", api_key=api_key)
    if max_body_bytes is not None:
        server_config.max_body_bytes = max_body_bytes
    app = create_app(pretrained, engine, server_config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(sock.getsockname()[1], engine, api_key)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
        sock.close()


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
