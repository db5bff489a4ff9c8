"""Real serving processes on 127.0.0.1 for the serving tests, started once per session and always killed.

One controller (short heartbeat expiry, an API key) with three workers of the tiny checkpoint: ``main`` (the
README's command line: ``python palo/serve/model_worker.py --controller ... --worker ...``) serving ``ckpt``, and
two started with ``python -m palo.serve.model_worker`` serving the same checkpoint as ``twin`` (for fail-over).
All four start in parallel, so the suite pays the start-up time once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from serve_helpers import (
    API_KEY,
    HEART_BEAT_EXPIRATION,
    HEART_BEAT_INTERVAL,
    START_TIMEOUT,
    Service,
    free_port,
    wait_until,
)


@dataclass
class Cluster:
    controller: Service
    main: Service
    twins: list[Service]
    model: str = "ckpt"
    twin_model: str = "twin"
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.controller.url


def _python() -> list[str]:
    return [sys.executable]


@pytest.fixture(scope="session")
def cluster(world, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logdir = str(tmp_path_factory.mktemp("serve_logs"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PALO_LOGDIR=logdir, TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cport, mport, t1, t2 = (free_port() for _ in range(4))
    curl = f"http://127.0.0.1:{cport}"
    controller = Service("controller", _python() + [
        "palo/serve/controller.py", "--host", "127.0.0.1", "--port", str(cport),
        "--heart-beat-expiration", str(HEART_BEAT_EXPIRATION), "--api-key", API_KEY, "--enable-prompt-tokens-details",
    ], os.path.join(logdir, "controller.out"), env, url=curl)

    def worker(name: str, port: int, model_name: str, module: bool, extra: list[str]) -> Service:
        entry = ["-m", "palo.serve.model_worker"] if module else ["palo/serve/model_worker.py"]
        # The README's flags: --controller / --worker are prefix abbreviations of the real flag names.
        return Service(name, _python() + entry + [
            "--host", "127.0.0.1", "--controller", curl, "--port", str(port), "--worker", f"http://127.0.0.1:{port}",
            "--model-path", world.full_dir, "--model-name", model_name, "--device", "cpu",
            "--heart-beat-interval", str(HEART_BEAT_INTERVAL), *extra,
        ], os.path.join(logdir, f"{name}.out"), env, url=f"http://127.0.0.1:{port}")

    main = worker("main", mport, "ckpt", False, ["--limit-model-concurrency", "16", "--max-batch-size", "16"])
    twins = [worker(f"twin{i}", port, "twin", True, []) for i, port in enumerate((t1, t2))]
    services = [controller, main, *twins]
    try:
        for service in services:
            service.start()

        def ready() -> bool:
            for service in services:
                if not service.alive():
                    raise RuntimeError(f"{service.name} exited early:\n{service.log()[-3000:]}")
            status = httpx.post(curl + "/worker_get_status", timeout=2).json()
            return status["speed"] == 3

        wait_until(ready, START_TIMEOUT, "the controller and three workers")
        yield Cluster(controller, main, twins)
    finally:
        for service in reversed(services):
            service.kill()
