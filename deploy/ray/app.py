"""loss-service on Ray Serve: the service's own ASGI app, one copy per replica.

Each replica builds ``service.main.create_app`` (the same FastAPI app that
``loss-service serve`` runs, with its lifespan: warm-up, device probe) and
Serve's proxy hands it the HTTP requests; there is no second implementation.
The only addition is two response headers naming the replica and the Ray node
that answered, so that a client or a test can see how requests spread.

    serve run deploy/ray/serve.yaml          # from the repository root
    serve deploy deploy/ray/serve.yaml       # to a running cluster

Settings travel two ways: ``LOSS_SERVICE_*`` variables in the application's
``runtime_env.env_vars`` (read by each replica, as in any other deployment),
and ``args.settings`` in the Serve config (field names of
``service.config.Settings``, checked when the application is built, so a
misspelt one fails the deploy instead of being ignored). ``args.settings``
wins over the environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.runtime_context import get_runtime_context
from ray.serve import Application, Deployment
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings

REPLICA_HEADER = b"x-serve-replica"
NODE_HEADER = b"x-ray-node"
# Serve-only settings of the HTTP server the replica does not run: the proxy
# owns the sockets, so these would be silently unused.
PROXY_OWNED = frozenset({"host", "port", "workers"})


class ReplicaHeaders:
    """Adds ``X-Serve-Replica`` and ``X-Ray-Node`` to every HTTP response."""

    def __init__(self, app: ASGIApp, replica: str, node: str) -> None:
        self.app = app
        self.headers = [(REPLICA_HEADER, replica.encode()), (NODE_HEADER, node.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_named)


def check_settings(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The ``args.settings`` mapping, checked against ``Settings``: unknown
    names and names the proxy owns are errors, and the values must validate."""
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise ValueError(
            f"args.settings: unknown setting(s) {unknown}; known: {sorted(Settings.model_fields)}"
        )
    owned = sorted(set(overrides) & PROXY_OWNED)
    if owned:
        raise ValueError(
            f"args.settings: {owned} belong to Serve's proxy (http_options, num_replicas), "
            "not to a replica"
        )
    try:
        Settings(**overrides)
    except ValidationError as error:
        raise ValueError(f"args.settings: {error}") from None
    return dict(overrides)


class LossService:
    """A Serve replica holding one copy of the service's ASGI app."""

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        # Built here, in the replica, so LOSS_SERVICE_* from the runtime_env
        # are read where they were set; the driver only checked the names.
        self.settings = Settings(**(settings or {}))

    def __serve_build_asgi_app__(self) -> ASGIApp:
        # Imported in the replica: the driver and the controller never load torch.
        from service.main import create_app

        app = create_app(self.settings)
        replica = serve.get_replica_context().replica_id.unique_id
        node = get_runtime_context().get_node_id()
        # Outermost, beside the service's own middleware, so the compute
        # routes' fast dispatch and FastAPI's routes both carry the headers,
        # and Serve still sees a FastAPI app (its docs path, its exception
        # handlers).
        inner_stack = app.build_middleware_stack
        app.build_middleware_stack = lambda: ReplicaHeaders(  # type: ignore[method-assign]
            inner_stack(), replica, node
        )
        return app


# The defaults of a config that names none; deploy/ray/serve.yaml sets them.
deployment: Deployment = serve.deployment(
    name="LossService", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8
)(serve.ingress()(LossService))


def build(args: dict[str, Any]) -> Application:
    """Application builder for ``import_path: deploy.ray.app:build``; ``args``
    may hold ``settings``, a mapping of ``Settings`` field names to values."""
    unknown = sorted(set(args) - {"settings"})
    if unknown:
        raise ValueError(f"args: unknown key(s) {unknown}; only 'settings' is read")
    settings = check_settings(args.get("settings") or {})
    return deployment.bind(settings)
