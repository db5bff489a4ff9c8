"""The web demo's example images: drawn into the checkout's ``images/``, and, for an installed package (no checkout
above ``palo/``, ``site-packages`` maybe read-only), into the user's cache, never beside the package."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from palo.serve import examples


def test_a_checkout_uses_its_images_folder():
    assert examples.examples_dir() == examples.IMAGES_DIR
    rows = examples.example_rows()
    assert len(rows) == len(examples.EXAMPLES) and all(os.path.dirname(path) == examples.IMAGES_DIR for path, _ in rows)


def test_an_installed_package_draws_them_in_the_cache_not_in_site_packages(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"  # what lies above an installed palo/: no pyproject.toml, no images/
    site.mkdir()
    monkeypatch.setattr(examples, "REPO_ROOT", str(site))
    monkeypatch.setattr(examples, "IMAGES_DIR", str(site / "images"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rows = examples.example_rows()
    assert os.listdir(site) == []
    assert {os.path.dirname(path) for path, _ in rows} == {str(tmp_path / "cache" / "palo" / "images")}
    assert all(Image.open(path).size[0] > 0 for path, _ in rows)


def test_the_page_is_built_without_examples_where_they_cannot_be_drawn(tmp_path, monkeypatch):
    """A read-only install tree stopped the web server from starting (OSError while drawing)."""
    pytest.importorskip("gradio")
    from palo.serve import gradio_web_server as web

    def unwritable(out_dir=None):
        raise PermissionError(30, "Read-only file system", str(tmp_path / "images"))

    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    monkeypatch.setattr(examples, "example_rows", unwritable)
    demo = web.build_demo(web.WebServer("http://127.0.0.1:9"), ["ckpt"], "once")
    assert any(f.name == "on_add" for f in demo.fns.values())
    assert "Examples (Hindi" not in str(demo.config)
    monkeypatch.undo()
    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    assert "Examples (Hindi" in str(web.build_demo(web.WebServer("http://127.0.0.1:9"), ["ckpt"], "once").config)
