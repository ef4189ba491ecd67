"""Command line: ``loss-service serve`` and ``loss-service openapi``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loss-service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server (uvicorn)")
    serve.add_argument("--host", help="default LOSS_SERVICE_HOST")
    serve.add_argument("--port", type=int, help="default LOSS_SERVICE_PORT")
    serve.add_argument("--workers", type=int, help="default LOSS_SERVICE_WORKERS")
    export = commands.add_parser("openapi", help="write the OpenAPI document")
    export.add_argument("--out", type=Path, help="file to write (default: stdout)")
    args = parser.parse_args(argv)

    if args.command == "serve":
        import uvicorn

        from service.config import settings

        uvicorn.run(
            "service.main:app",
            host=args.host or settings.host,
            port=args.port if args.port is not None else settings.port,
            workers=args.workers or settings.workers,
            log_level=settings.log_level,
        )
        return 0

    from service.main import app

    text = orjson.dumps(app.openapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    if args.out:
        args.out.write_bytes(text)
    else:
        sys.stdout.buffer.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
