"""``palo demo``: a tiny checkpoint built on the spot, then a chat in four languages about an image, in a checkout
(its ``images/shapes.png``) and in an installed package (no ``images/``: an image drawn in the work folder)."""

from __future__ import annotations

import os

from palo.testing import demo


def test_the_demo_chats_also_where_no_images_folder_was_installed(tmp_path, monkeypatch, capsys):
    from palo.serve import examples

    monkeypatch.setattr(examples, "IMAGES_DIR", str(tmp_path / "site-packages" / "images"))  # nothing there
    workdir = tmp_path / "runs"
    assert demo.main(["--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "chatting in 4 languages" in out and out.count("\nASSISTANT: ") == len(demo.QUESTIONS)
    assert all(f"USER: {question}" in out for question in demo.QUESTIONS)
    assert (workdir / "shapes.png").is_file() and (workdir / "tiny-palo" / "config.json").is_file()
    assert not os.path.exists(tmp_path / "site-packages")
