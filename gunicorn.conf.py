"""Production settings for gunicorn: `gunicorn -c gunicorn.conf.py main:app`.

Values come from the same environment variables and `.env` as the server itself (README.md,
"Configuration" and "Deployment"); options given on the command line override them.
"""

from __future__ import annotations

import math
import os

# Production never serves another model than the one configured: without it, start-up fails loudly
# instead of falling back to the small model (an explicit MODEL_FALLBACK=true still wins).
os.environ.setdefault("MODEL_FALLBACK", "false")
# Nor does it publish the interactive API documentation (an explicit API_DOCS=true still wins).
os.environ.setdefault("API_DOCS", "false")

# Settings are pydantic only: reading them here imports neither torch nor CUDA into the master.
from real_time_audio.config import load_settings  # after the production default above
from real_time_audio.storage.archive import SessionArchive

ENGINE_STOP_S = 10
SHUTDOWN_MARGIN_S = math.ceil(SessionArchive.SHUTDOWN_TIMEOUT_S) + ENGINE_STOP_S

_settings = load_settings()
# An unset HOST means every interface here (a server or a container), unlike `python main.py`.
_host = _settings.host if "host" in _settings.model_fields_set else "0.0.0.0"

# Listen on HOST:PORT (default 0.0.0.0:8000); an IPv6 address needs brackets.
bind = f"[{_host}]:{_settings.port}" if ":" in _host else f"{_host}:{_settings.port}"
# One worker per GPU: every worker loads its own model copy, and all of them use DEVICE. With several
# GPUs run one gunicorn per GPU (DEVICE=cuda:N, distinct PORT) rather than raising this.
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
# The maintained ASGI worker from the uvicorn-worker package, with the server's connection limit and
# request-head deadline (MAX_CONNECTIONS, HEADER_TIMEOUT_S; real_time_audio/ops/server.py).
worker_class = "real_time_audio.ops.server.UvicornWorker"
# The heartbeat starts only after the lifespan has loaded and warmed up the model, so keep this above that.
timeout = 300
# SIGTERM gives open sessions DRAIN_TIMEOUT_S for their finals; then up to 20 s to finish the S3 uploads
# of the sessions just closed (SessionArchive.SHUTDOWN_TIMEOUT_S) and 10 s to stop the engine, before SIGKILL.
graceful_timeout = math.ceil(_settings.drain_timeout_s) + SHUTDOWN_MARGIN_S
# Seconds an idle HTTP keep-alive connection stays open (WebSocket sessions are not affected).
keepalive = 5
# Never preload: the model must load in each worker after the fork (CUDA is never initialised in the master).
preload_app = False
# Never recycle workers after N requests: each restart would reload the model.
max_requests = 0
# Proxies whose X-Forwarded-For/-Proto are trusted, so per-client limits and logs see the real client address.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# Access log to stdout (uvicorn's request and WebSocket lines go through it).
accesslog = "-"
# gunicorn's own log to the console as well ("-" is stderr), where Docker and systemd collect it.
errorlog = "-"
# gunicorn and uvicorn log at the server's LOG_LEVEL.
loglevel = _settings.log_level.lower()
# LOG_FORMAT=json: gunicorn's own lines (master and workers) are JSON objects too, like the server's.
if _settings.log_format == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "real_time_audio.ops.logs.JsonFormatter"}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "gunicorn.error": {"handlers": ["console"], "level": loglevel.upper(), "propagate": False},
            "gunicorn.access": {"handlers": ["access"], "level": loglevel.upper(), "propagate": False},
        },
    }
