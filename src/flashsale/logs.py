"""Logging set-up for the command line and the long-running processes."""

from __future__ import annotations

import logging
import logging.config
from typing import Any

#: The RocketMQ client writes its own rotating file under ~/logs at import; we fold it into ours instead.
ROCKETMQ_CLIENT_LOGGER = "rocketmq-python-client"


def log_config(level: str = "INFO", process: str = "flashsale") -> dict[str, Any]:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "line": {"format": f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s"},
        },
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


def configure(level: str = "INFO", process: str = "flashsale") -> None:
    logging.config.dictConfig(log_config(level, process))
