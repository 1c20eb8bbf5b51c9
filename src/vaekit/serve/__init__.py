"""The web demo, `vaekit serve RUN`: an optional extra (pip install 'vaekit[demo]').

The core never imports this package, so vaekit installs and runs without FastAPI or uvicorn.
"""
from .app import Demo, create_app, load
from .server import serve

__all__ = ["Demo", "create_app", "load", "serve"]
