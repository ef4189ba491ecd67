"""Command line: ``loss-service serve`` and ``loss-service openapi``."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import orjson


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loss-service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="start the HTTP server (uvicorn)")
    serve_cmd.add_argument("--host", help="default LOSS_SERVICE_HOST")
    serve_cmd.add_argument("--port", type=int, help="default LOSS_SERVICE_PORT")
    serve_cmd.add_argument("--workers", type=int, help="default LOSS_SERVICE_WORKERS")
    export = commands.add_parser("openapi", help="write the OpenAPI document")
    export.add_argument("--out", type=Path, help="file to write (default: stdout)")
    args = parser.parse_args(argv)

    if args.command == "serve":
        serve(args.host, args.port, args.workers)
        return 0

    from service.main import app

    text = orjson.dumps(app.openapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    if args.out:
        args.out.write_bytes(text)
    else:
        sys.stdout.buffer.write(text)
    return 0


def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Start uvicorn with the settings; on SIGTERM, /readyz turns 503 first,
    then (after LOSS_SERVICE_SHUTDOWN_DRAIN_SECONDS) uvicorn stops accepting
    and lets in-flight requests finish."""
    import uvicorn

    from service import logs
    from service.config import settings

    logs.configure(settings.log_level, settings.log_format)
    host = host or settings.host
    port = port if port is not None else settings.port
    workers = workers or settings.workers
    common: dict[str, Any] = {
        "host": host, "port": port, "log_config": None, "access_log": False,
        "timeout_graceful_shutdown": settings.compute_timeout,
    }  # fmt: skip
    if workers > 1:
        # uvicorn's supervisor forwards SIGTERM to each worker, which drains on its own
        uvicorn.run("service.main:app", workers=workers, **common)
        return

    from service.main import app

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            runtime = app.state.runtime
            delay = settings.shutdown_drain_seconds
            if runtime.draining or not delay:
                runtime.draining = True
                super().handle_exit(sig, frame)
                return
            runtime.draining = True
            threading.Timer(delay, super().handle_exit, (sig, frame)).start()

    DrainingServer(uvicorn.Config(app, **common)).run()


if __name__ == "__main__":
    raise SystemExit(main())
