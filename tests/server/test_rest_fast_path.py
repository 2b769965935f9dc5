"""The REST inference route bypasses FastAPI's router (server/rest/app.py: InferFirst) and answers exactly as
the routed handler does: the same outputs, the same error statuses and bodies; every other path and method still
goes through FastAPI."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from foldserve.errors import ModelNotFound
from server.core.dataplane import DataPlane
from server.rest.app import INFER_PATH, InferFirst, _handler, create_app
from server.settings import Settings
from tests.server.conftest import digits_batch


def test_the_infer_paths_and_nothing_else_take_the_short_way():
    assert INFER_PATH.fullmatch("/v2/models/digits/infer").groups() == ("digits", None)
    assert INFER_PATH.fullmatch("/v2/models/digits/versions/3/infer").groups() == ("digits", "3")
    for other in ("/v2/models/digits", "/v2/models/digits/infer/x", "/v2/models//infer", "/v2/models/a/b/infer"):
        assert INFER_PATH.fullmatch(other) is None
    assert _handler(ModelNotFound("x")).__name__ == "_foldserve_error"
    assert _handler(ValueError("x")).__name__ == "_internal_error"


@pytest.mark.slow
def test_both_ways_answer_alike(repository):
    x = digits_batch(2)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]})

    async def scenario() -> None:
        dp = DataPlane(Settings(repository=repository, models=["digits"], warmup=False))
        await dp.start()
        try:
            routed = create_app(dp.settings, dp)
            answers = []
            for app in (routed, InferFirst(routed)):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                    answers.append([(r.status_code, r.json()) for r in [
                        await c.post("/v2/models/digits/infer", content=body),
                        await c.post("/v2/models/digits/versions/1/infer", content=body),
                        await c.post("/v2/models/digits/versions/9/infer", content=body),
                        await c.post("/v2/models/nope/infer", content=body),
                        await c.post("/v2/models/digits/infer", content=b"{not json"),
                        await c.get("/v2/models/digits/infer"),
                        await c.get("/v2/models/digits")]])
            assert answers[0] == answers[1]
            assert [status for status, _ in answers[1]] == [200, 200, 404, 404, 400, 405, 200]
        finally:
            await dp.stop()

    asyncio.run(scenario())
