"""The controller's router tells a worker that is gone from its own shortage: out of file descriptors under load,
a connect failed as if the worker were gone, and the controller dropped healthy workers and answered 404 "no such
model" until their next heartbeat. Real sockets and a real descriptor limit, in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = r'''
import asyncio, json, logging, resource, socket, threading
from palo.serve.routing import Router, WorkerUnreachableError

class Registry:
    logger = logging.getLogger("test")
    def __init__(self):
        self.removed = []
    def remove_worker(self, address):
        self.removed.append(address)

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(100)
address = "http://127.0.0.1:%d" % listener.getsockname()[1]

def serve():
    while True:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        conn.close()

threading.Thread(target=serve, daemon=True).start()

async def main():
    registry = Registry()
    router = Router(registry, 5.0)
    seen = [(await router._reach(address, router.client.post(address + "/x"))).status_code]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    hog = []
    try:
        while True:
            hog.append(open("/dev/null"))
    except OSError:
        pass
    try:
        await router._reach(address, router.client.post(address + "/x"))
        seen.append("answered")
    except WorkerUnreachableError as exc:
        seen.append([str(exc), exc.retry_after])
    seen.append(list(registry.removed))
    for f in hog:
        f.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    gone = "http://127.0.0.1:9"  # nothing listens there: that worker is gone, and is dropped
    seen.append(type(await router._reach(gone, router.client.post(gone + "/x"))).__name__)
    seen.append(list(registry.removed))
    await router.aclose()
    print(json.dumps(seen))

asyncio.run(main())
'''


def test_running_out_of_descriptors_keeps_the_worker_and_answers_503_not_404():
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr[-3000:]
    first, refused, kept, gone, dropped = json.loads(run.stdout)
    assert first == 200
    assert refused == ["the controller cannot open a connection now (Too many open files): it is overloaded; "
                       "retry shortly", "1"]
    assert kept == []  # the worker was fine: it stays registered
    assert gone == "ConnectError" and dropped == ["http://127.0.0.1:9"]
