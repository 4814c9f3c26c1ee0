"""flashsale: flash-sale stock deduction with Redis Lua pre-deduct, RocketMQ transactional messages and MySQL."""

from __future__ import annotations

__version__ = "0.1.0"
