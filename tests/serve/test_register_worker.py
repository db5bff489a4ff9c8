"""``palo/serve/register_worker.py``: registering a worker with a controller by hand."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from serve_helpers import served

from palo.serve import register_worker


def _controller(list_models) -> FastAPI:
    """A controller that accepts every registration and answers ``/list_models`` with ``list_models()``."""
    app = FastAPI()

    @app.post("/register_worker")
    async def register():
        return JSONResponse({})

    @app.post("/list_models")
    async def models():
        return list_models()

    return app


def test_a_registration_is_reported_with_the_models_served(capsys):
    with served(_controller(lambda: JSONResponse({"models": ["b", "a"]}))) as url:
        rc = register_worker.main(["--controller-address", url, "--worker-name", "http://127.0.0.1:9/"])
    assert rc == 0 and capsys.readouterr().out.strip() == "registered http://127.0.0.1:9/; the controller now serves "\
        "['a', 'b']"


@pytest.mark.parametrize("answer", [lambda: PlainTextResponse("Internal Server Error", status_code=500),
                                    lambda: PlainTextResponse("not json"), lambda: JSONResponse({"nope": 1})])
def test_a_model_list_that_cannot_be_read_after_registering_is_one_clear_error_line(capsys, answer):
    """The /list_models call after a successful registration was outside the try: its failure was a traceback."""
    with served(_controller(answer)) as url:
        rc = register_worker.main(["--controller-address", url, "--worker-name", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("error: http://127.0.0.1:9 was registered, but the controller's model list could not be read")
