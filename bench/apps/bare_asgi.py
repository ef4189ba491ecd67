"""The ceiling: a bare ASGI app that reads the whole body and returns a constant.

With ``X-Response-Bytes: N`` it returns N bytes instead: the transport's cost
of a response as large as a gradient. Run:
``uvicorn bench.apps.bare_asgi:app --no-access-log``. Any method, any path.
"""

from __future__ import annotations

from typing import Any

BODY = b'{"value":0.0}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
LARGE: dict[int, bytes] = {}  # built once per size


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    chunks: list[bytes] = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    del body  # received in full, as any real handler would need it
    size = next((int(v) for k, v in scope["headers"] if k == b"x-response-bytes"), None)
    if size is None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    if size not in LARGE:
        LARGE[size] = b"0" * size
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % size)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": LARGE[size]})
