"""``palo.serve.launch``: the services ``palo quickstart`` and ``palo serve run-batch --model-path`` start."""

from __future__ import annotations

import subprocess

import pytest
from serve_helpers import free_port

from palo.serve import launch


def test_the_launcher_reaches_its_services_past_a_proxy_and_keeps_the_users_exemptions(tmp_path, monkeypatch):
    """With ``http_proxy`` set (a machine behind a proxy), the launcher's own readiness polls went to the proxy, so
    the controller was never found ready; and the services' ``NO_PROXY`` replaced the user's."""
    dead_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens: whatever goes through it fails
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.setenv("NO_PROXY", "models.corp.example")
    monkeypatch.delenv("no_proxy", raising=False)
    envs, real_popen = [], subprocess.Popen

    def popen(args, **kwargs):
        envs.append(kwargs["env"])
        return real_popen(args, **kwargs)

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    # The controller comes up; the worker then exits (no such checkpoint): the launcher got past the controller.
    with pytest.raises(RuntimeError, match="model worker: a service exited"):
        launch.start_services(str(tmp_path / "no-checkpoint"), str(tmp_path / "logs"), timeout=60)
    assert len(envs) == 2
    for env in envs:
        assert env["NO_PROXY"].split(",") == env["no_proxy"].split(",") == ["models.corp.example", "127.0.0.1",
                                                                            "localhost"]


def test_relative_paths_in_worker_args_name_what_they_name_for_the_caller(world, tmp_path, monkeypatch):
    """The services ran in the logs folder and only the checkpoint was made absolute: ``--vision-tower clip`` (or
    ``--model-base ./base``) then named a folder under the logs, and the worker exited 2."""
    import os

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(world.root)  # the caller's paths are relative to here
    logs = tmp_path / "logs"
    before = sorted(os.listdir(world.root))
    services = launch.start_services(os.path.basename(world.full_dir), str(logs),
                                     worker_args=["--device", "cpu", "--vision-tower",
                                                  os.path.relpath(world.clip_dir, world.root)], timeout=120)
    try:
        assert services.model_name
    finally:
        services.stop()
    assert (logs / "model_worker.out").is_file() and list(logs.glob("model_worker_*.log"))
    assert sorted(os.listdir(world.root)) == before  # the logs went to their folder, not the working directory
