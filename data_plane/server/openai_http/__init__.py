"""The OpenAI-compatible HTTP API of a worker: `build_app` (Starlette) served by `HttpServer` (uvicorn)."""

from data_plane.server.openai_http.app import OpenAIApi, build_app
from data_plane.server.openai_http.server import HttpServer

__all__ = ["HttpServer", "OpenAIApi", "build_app"]
