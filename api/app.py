"""The FastAPI application factory: `uvicorn api.app:create_app --factory`."""

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.deps import Authenticate
from api.errors import PayloadTooLarge, error_response, install_error_handlers
from api.observability import Metrics, RequestTimer
from api.routes import dashboard, datasets, health, jobs, metrics, streams, workers
from api.services.events import JobWatcher
from api.services.reconciler import reconcile
from kiln import __version__, reads
from kiln.db import get_sessionmaker
from kiln.logs import use_json
from kiln.settings import Settings, get_settings
from kiln.storage import make_store

log = logging.getLogger("kiln.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    api_key = settings.resolved_api_key()
    if not api_key:
        raise RuntimeError(
            f"No API key configured: set KILN_API_KEY or write one to {settings.api_key_file} "
            "(`kiln up` creates it on first start)."
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_reconcile_forever(settings)), asyncio.create_task(app.state.watcher.run())]
        # Everything imported and built so far lives as long as the process: move it out of the collector's
        # sight, so a full collection no longer walks it in the middle of requests (GET /healthz under wrk:
        # p99 88 -> 17 ms; BENCHMARKS.md section 5).
        gc.freeze()
        yield
        for task in tasks:
            task.cancel()
        await reads.close()

    app = FastAPI(
        title="kiln",
        version=__version__,
        summary="Training jobs as a service: submit a spec, watch the loss fall, download the weights.",
        lifespan=lifespan,
    )
    if settings.log_format == "json":
        for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
            use_json(logging.getLogger(name))
    app.state.store = make_store(settings)
    app.state.watcher = JobWatcher()
    app.state.metrics = Metrics(settings)
    install_error_handlers(app)

    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, paths={datasets.router.prefix: settings.max_upload_bytes}
    )
    app.add_middleware(Authenticate, deployment_key=api_key)  # before BodyLimit reads a byte of the body
    app.add_middleware(RequestTimer, metrics=app.state.metrics)  # outermost: a 413 is timed too
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(streams.router)
    app.include_router(datasets.router)
    app.include_router(workers.router)
    app.include_router(dashboard.router)
    return app


class BodyLimit:
    """Refuses a request whose declared body is over the limit before reading it, and one that declares no
    length (chunked) as soon as what it sent passes the limit. Plain ASGI, so an error raised later in the
    request is not entangled with a middleware's response handling. `paths` gives some paths (uploads) a
    limit of their own."""

    def __init__(self, app, max_bytes: int, paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.max_bytes)

        async def too_large(scope, receive, send) -> None:  # built only when needed: most requests never are
            err = PayloadTooLarge(f"The request body is over {limit} bytes; send a smaller one.")
            await error_response(err.status, err.code, err.message)(scope, receive, send)

        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await too_large(scope, receive, send)
            return

        received, over, started = 0, False, False

        async def counted_receive():
            # Past the limit the app is told the client left: it stops reading, and its answer is replaced.
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit and not started:
                over = True
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if not over:
                started = True
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over:
            await too_large(scope, receive, send)


async def _reconcile_forever(settings: Settings) -> None:
    def once():
        with get_sessionmaker()() as session:
            return reconcile(session, settings)

    while True:
        await asyncio.sleep(settings.reconcile_interval_s)
        try:
            if done := await run_in_threadpool(once):
                log.info("reconciled: %s", done)
        except Exception:
            log.warning("reconciliation failed; will retry", exc_info=True)
