"""The one server: a FastAPI app with the OpenAI-compatible routes (/v1/...) and the Gradio page
mounted at /, served by uvicorn (blocking for app.py, or on a background thread for tests and
scripts)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import gradio as gr
import uvicorn
from fastapi import FastAPI

from . import openai_api


def build_server(app) -> FastAPI:
    """app: a demo.App. Its page and the API routes share its engines, limits and streams."""
    api = FastAPI(title="GenARM", docs_url=None, redoc_url=None, openapi_url=None)
    api.state.genarm = app.context
    api.include_router(openai_api.router)
    return gr.mount_gradio_app(api, app.blocks, path="/", show_error=False)


SHUTDOWN_S = 5  # on stop (SIGTERM, Ctrl-C), open streams get this long before they are cut


def _server(app, host: str, port: int) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(build_server(app), host=host, port=port, log_level="warning",
                                         timeout_graceful_shutdown=SHUTDOWN_S))


def serve(app, host: str, port: int):
    """Serves until interrupted (app.py)."""
    print(f"* GenARM: the page at http://{host}:{port}/, the OpenAI-compatible API at http://{host}:{port}/v1")
    _server(app, host, port).run()


@dataclass
class Running:
    """A server on a background thread: its URL, and stop()."""
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def serve_in_background(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60) -> Running:
    """Starts the server on a thread (port 0: a free one) and returns once it answers."""
    server = _server(app, host, port)
    thread = threading.Thread(target=server.run, daemon=True, name="genarm-server")
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return Running(f"http://{host}:{bound}/", server, thread)
