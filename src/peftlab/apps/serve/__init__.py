"""Serving adapters over HTTP: one base model, many adapters, requests batched across adapters
(generation continuously: requests join and leave the running decode between steps).

    engine = load_engine("smollm2", "adapters/", causal=True, max_adapters=8)
    serve(engine, port=8000)                   # or create_app(engine) for TestClient / uvicorn

Needs the `serve` extra (FastAPI and uvicorn): pip install 'peftlab[serve]'.
"""

from .app import create_app, serve
from .batcher import Batcher, ServerClosing
from .engine import Engine, Job, RequestError, Sampling, load_engine
from .scheduler import Finished, GenerationRequest, RequestStream, Scheduler

__all__ = ["Batcher", "Engine", "Finished", "GenerationRequest", "Job", "RequestError", "RequestStream",
           "Sampling", "Scheduler", "ServerClosing", "create_app", "load_engine", "serve"]
