"""Logging set-up for the command line and the long-running processes.

Two formats (FLASHSALE_LOG_FORMAT): `text`, one line per event, and `json`, one JSON object per line
for log shippers. Events about a purchase or a message carry its ids as fields (see `ids`), which the
JSON format puts beside the message.
"""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

#: The RocketMQ client writes its own rotating file under ~/logs at import; we fold it into ours instead.
ROCKETMQ_CLIENT_LOGGER = "rocketmq-python-client"
#: The ids an event may carry, by the name of their field.
ID_FIELDS = ("token", "sku", "message_id")
FORMATS = ("text", "json")


def ids(*, token: str | None = None, sku: str | None = None, message_id: str | None = None) -> dict[str, Any]:
    """`extra=` for a log call about a purchase or a message: `logger.info(..., extra=ids(sku=sku))`."""
    return {k: v for k, v in (("token", token), ("sku", sku), ("message_id", message_id)) if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, process, pid, logger, message, ids, exception."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self._process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                event[name] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def log_config(level: str = "INFO", process: str = "flashsale", fmt: str = "text") -> dict[str, Any]:
    formatter: dict[str, Any] = (
        {"()": JsonFormatter, "process": process}
        if fmt == "json"
        else {"format": f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "flashsale": {"level": level, "handlers": ["stderr"], "propagate": False},
            ROCKETMQ_CLIENT_LOGGER: {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
            "aiohttp.access": {"level": "WARNING"},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }


def configure(level: str = "INFO", process: str = "flashsale", fmt: str = "text") -> None:
    logging.config.dictConfig(log_config(level, process, fmt if fmt in FORMATS else "text"))
