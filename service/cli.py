"""Command line: ``loss-service serve | openapi | losses | compute``, and
``loss-service --version`` (also ``python -m service``).

Exit codes: 0 success; 1 the server answered with an error (its problem
details go to stderr); 2 usage errors (bad arguments, unreadable tensor
files), as argparse does; 3 the server could not be reached (connection
refused, timeout).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from service.client import LossClient, LossResult

EXIT_SERVER_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
    except BrokenPipeError:
        # the reader went away (loss-service losses | head): not an error; keep
        # Python from complaining again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="loss-service")
    parser.add_argument(
        "--version", action=_VersionAction, help="print the service, torch and CUDA versions"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="start the HTTP server (uvicorn)")
    serve_cmd.add_argument("--host", help="default LOSS_SERVICE_HOST")
    serve_cmd.add_argument("--port", type=int, help="default LOSS_SERVICE_PORT")
    serve_cmd.add_argument("--workers", type=int, help="default LOSS_SERVICE_WORKERS")
    export = commands.add_parser("openapi", help="write the OpenAPI document")
    export.add_argument("--out", type=Path, help="file to write (default: stdout)")

    catalog = commands.add_parser(
        "losses",
        help="list the losses: arguments, options with defaults, differentiable arguments",
        description="Without --url, the catalog of the installed service (no server needed); "
        "with --url, the catalog of that server.",
    )
    catalog.add_argument("--url", help="ask this server instead of reading the installed catalog")
    _connection_args(catalog)
    catalog.add_argument("--json", action="store_true", help="print the catalog as JSON")

    compute = commands.add_parser(
        "compute",
        help="evaluate a loss on tensors read from files, on a running server",
        description="Tensor files: .json (a number, a nested array or a tensor object of the "
        "HTTP contract), .npy (numpy.save) or .pt (torch.save of one tensor). Options are "
        "parsed as JSON when they parse (label_smoothing=0.1), else kept as strings "
        "(reduction=sum).",
    )
    compute.add_argument("name", help="loss name (cross_entropy) or torch.nn class (MSELoss)")
    compute.add_argument("--input", type=Path, metavar="FILE", help="the input tensor")
    compute.add_argument("--target", type=Path, metavar="FILE", help="the target tensor")
    compute.add_argument(
        "--tensor", action="append", default=[], metavar="NAME=FILE",
        help="any other tensor argument (weight=w.npy, input1=a.pt, ...); repeatable",
    )  # fmt: skip
    compute.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="an option or request field (reduction=sum, ignore_index=-1, device=cpu); "
        "repeatable",
    )  # fmt: skip
    compute.add_argument(
        "--grad", nargs="?", const=True, default=False, metavar="NAMES",
        help="also print gradients: of the prediction arguments, or of NAMES "
        "(comma-separated, e.g. input,target)",
    )  # fmt: skip
    compute.add_argument(
        "--url", help="server (default $LOSS_SERVICE_URL or http://127.0.0.1:8000)"
    )
    _connection_args(compute)
    compute.add_argument("--precision", type=int, default=4, help="decimals printed (default 4)")
    compute.add_argument("--json", action="store_true", help="print the response JSON")
    args = parser.parse_args(argv)

    if args.command == "serve":
        serve(args.host, args.port, args.workers)
        return 0
    if args.command == "losses":
        return _remote(lambda: list_losses(args))
    if args.command == "compute":
        fields = _compute_fields(args, compute)
        return _remote(lambda: compute_loss(args, fields))

    from service.main import app

    text = orjson.dumps(app.openapi(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    if args.out:
        args.out.write_bytes(text)
    else:
        sys.stdout.buffer.write(text)
    return 0


class _VersionAction(argparse.Action):
    """``--version``: built when asked for, since it imports torch."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from service import version_info

        print(version_line(version_info(local_devices())))
        parser.exit()


def local_devices() -> list[str]:
    """The devices torch sees here (what ``/readyz`` and ``/version`` list)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def version_line(info: dict[str, Any]) -> str:
    return (
        f"{info['name']} {info['version']} (torch {info['torch']}, "
        f"CUDA {info['cuda'] or 'none'}, devices: {', '.join(info['devices'])})"
    )


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", help="API key (default $LOSS_SERVICE_API_KEY)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument(
        "--max-retries", type=int, default=3, help="retries on 503 or connection errors (default 3)"
    )


def _client(args: argparse.Namespace) -> LossClient:
    from service.client import LossClient

    return LossClient(
        args.url, api_key=args.api_key, timeout=args.timeout, max_retries=args.max_retries
    )


def _remote(command: Callable[[], int]) -> int:
    """Run a command that may talk to a server; its failures become exit codes."""
    import httpx

    from service.client import LossServiceError, ServiceUnreachableError

    try:
        return command()
    except ServiceUnreachableError as exc:  # before LossServiceError: it is one
        try:
            where = str(exc.request.url)
        except RuntimeError:  # refused before httpx made a request
            where = exc.url
        print(f"loss-service: cannot reach {where}: {exc.reason}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except LossServiceError as exc:
        print(f"loss-service: {exc}", file=sys.stderr)
        for error in exc.errors[1:]:  # the first one is the detail
            where = ".".join(str(p) for p in error.get("loc", []) if p != "body")
            print(f"  {where}: {error.get('msg')}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except httpx.TransportError as exc:
        try:
            where = str(exc.request.url)
        except RuntimeError:  # no request attached
            where = "the server"
        print(f"loss-service: cannot reach {where}: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_UNREACHABLE


# --------------------------------------------------------------------------- losses


def list_losses(args: argparse.Namespace) -> int:
    if args.url:
        with _client(args) as client:
            infos = client.losses()
    else:
        from service.losses import LOSSES
        from service.losses.info import loss_info

        infos = [loss_info(spec) for spec in LOSSES.values()]
    if args.json:
        print(json.dumps({"losses": infos}, indent=2))
    else:
        width = shutil.get_terminal_size((100, 24)).columns
        print(catalog_table(infos, max(width, 80) - 1))
    return 0


def catalog_table(infos: list[dict[str, Any]], width: int = 99) -> str:
    """The catalog as a text table, cells wrapped to fit ``width`` columns."""
    rows = [
        (
            info["name"],
            ", ".join(a["name"] + ("" if a["required"] else "?") for a in info["arguments"]),
            ", ".join(info["differentiable"]),
            ", ".join(f"{o['name']}={_option_text(o['default'])}" for o in info["options"]),
        )
        for info in infos
    ]
    header = ("LOSS", "ARGUMENTS", "GRAD", "OPTIONS (defaults)")
    name_width = max(len(r[0]) for r in [header, *rows])
    rest = max(width - name_width - 6, 45)
    widths = [name_width, rest * 36 // 100, rest * 24 // 100]
    widths.append(rest - widths[1] - widths[2])
    lines: list[str] = []
    for row in [header, *rows]:
        cells = [
            textwrap.wrap(text, w, break_on_hyphens=False) or [""]
            for text, w in zip(row, widths, strict=True)
        ]
        for i in range(max(len(c) for c in cells)):
            parts = [
                (c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)
            ]
            lines.append("  ".join(parts).rstrip())
    lines.append("")
    lines.append("? optional argument; GRAD: the arguments whose gradient can be asked for")
    return "\n".join(lines)


def _option_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------- compute


def _compute_fields(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The request fields from the command line; a usage error exits with 2."""
    files: dict[str, Path] = {}
    if args.input is not None:
        files["input"] = args.input
    if args.target is not None:
        files["target"] = args.target
    for spec in args.tensor:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--tensor expects NAME=FILE, got {spec!r}")
        files[name] = Path(path)
    fields: dict[str, Any] = {}
    for name, path in files.items():
        try:
            fields[name] = read_tensor(path)
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            parser.error(f"{name}: cannot read {path}: {exc}")
    for spec in args.option:
        key, sep, text = spec.partition("=")
        if not sep or not key:
            parser.error(f"--option expects KEY=VALUE, got {spec!r}")
        try:
            fields[key] = json.loads(text)
        except ValueError:
            fields[key] = text
    if args.grad is not False:
        fields["grad"] = True if args.grad is True else args.grad.split(",")
    if args.json:
        fields.setdefault("encoding", "nested")  # readable, as curl would show it
    return fields


def read_tensor(path: Path) -> Any:
    """A tensor file: .json (as sent on the wire), .npy or .pt."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".npy":
        import numpy as np

        return np.load(path, allow_pickle=False)
    if suffix in (".pt", ".pth"):
        import torch

        value = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected one saved tensor, got {type(value).__name__}")
        return value
    raise ValueError(f"unknown file type {suffix!r}; expected .json, .npy or .pt")


def compute_loss(args: argparse.Namespace, fields: dict[str, Any]) -> int:
    with _client(args) as client:
        result = client.loss(args.name, **fields)
    if args.json:
        print(json.dumps(result.raw, separators=(",", ":")))
    else:
        print("\n".join(format_result(result, args.precision)))
    return 0


def format_result(result: LossResult, precision: int = 4) -> Iterator[str]:
    """``name = value  (dtype, device)``, then ``grad <arg> = ...`` lines."""
    yield _assignment(result.loss, result.value, precision) + f"  ({result.dtype}, {result.device})"
    for name, grad in result.grad.items():
        yield _assignment(f"grad {name}", grad, precision)


def _assignment(label: str, tensor: Any, precision: int) -> str:
    import numpy as np
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    prefix = f"{label} = "
    text = np.array2string(tensor.numpy(), precision=precision, separator=", ", prefix=prefix)
    return prefix + text


def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Start uvicorn with the settings; on SIGTERM, /readyz turns 503 first,
    then (after LOSS_SERVICE_SHUTDOWN_DRAIN_SECONDS) uvicorn stops accepting
    and lets in-flight requests finish. A default device this machine does
    not have stops it before it starts, with one line."""
    import uvicorn

    from service import logs
    from service.config import SettingsError, check_device, settings

    try:
        check_device(settings.device)
    except SettingsError as exc:
        raise SystemExit(f"loss-service: {exc}") from None
    logs.configure(settings.log_level, settings.log_format)
    bind_host = host or settings.host
    bind_port = port if port is not None else settings.port
    n_workers = workers or settings.workers
    common: dict[str, Any] = {
        "host": bind_host, "port": bind_port, "access_log": False,
        # applied again by each worker process (it starts with Python's defaults)
        "log_config": logs.dict_config(settings.log_level, settings.log_format),
        "timeout_graceful_shutdown": settings.compute_timeout,
        # nothing reads the client's address: no X-Forwarded-* rewrite per request
        "proxy_headers": False,
        # header timeout, header size cap, uploads cut at shutdown
        "http": "service.api.connections:GuardedHttpToolsProtocol",
    }  # fmt: skip
    if n_workers > 1:
        # each worker starts on its own, so the line comes before they listen
        log_startup(bind_host, bind_port, n_workers, local_devices(), "starting")
        # uvicorn's supervisor forwards SIGTERM to each worker, which drains
        # as the app's lifespan arranged (service.main.drain_on_sigterm)
        uvicorn.run("service.main:app", workers=n_workers, **common)
        return

    from service.main import app

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and self.servers and self.servers[0].sockets:
                bound = self.servers[0].sockets[0].getsockname()[1]  # the real one for port 0
                log_startup(bind_host, bound, n_workers, app.state.devices, "serving")

    # on SIGTERM it drains as the app's lifespan arranged (service.main.drain_on_sigterm)
    AnnouncingServer(uvicorn.Config(app, **common)).run()


def browsable_url(host: str, port: int) -> str:
    """The server's URL as a browser on this machine can open it: a wildcard
    bind address (0.0.0.0 in the container) becomes the loopback one."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def log_startup(host: str, port: int, workers: int, devices: list[str], state: str) -> None:
    """One line saying where the docs are, which version, torch, CUDA and devices."""
    from service import version_info

    info = version_info(devices)
    base = browsable_url(host, port)
    fields = {
        "docs": f"{base}/docs", "version": info["version"], "torch": info["torch"],
        "cuda": info["cuda"] or "none", "devices": ",".join(devices), "workers": workers,
    }  # fmt: skip
    logging.getLogger("loss_service").info(f"{state} on {base}", extra={"fields": fields})


if __name__ == "__main__":
    raise SystemExit(main())
