"""Names and defaults that more than one module needs: the one place each of them is written down."""

from __future__ import annotations

import re

#: Prefix of every environment variable flashsale reads.
ENV_PREFIX = "FLASHSALE_"

# --- RocketMQ names -------------------------------------------------------------------------------
#: Default namespace; topics and groups are derived from it so two deployments can share a broker.
DEFAULT_NAMESPACE = "flashsale"
#: Committed deductions travel on this TRANSACTION-type topic (suffix after the namespace).
DEDUCTION_TOPIC_SUFFIX = "deductions"
#: Replays of lost or dead-lettered deductions travel on this NORMAL-type topic.
REPLAY_TOPIC_SUFFIX = "replays"
#: The consumer group that applies deductions to MySQL.
CONSUMER_GROUP_SUFFIX = "apply"
#: Payment deadlines travel on this DELAY-type topic: timer messages due when their orders are.
DEADLINE_TOPIC_SUFFIX = "deadlines"
#: The consumer group that expires orders still unpaid when their deadline fires.
EXPIRY_GROUP_SUFFIX = "expire"
#: Tag on every deadline message.
DEADLINE_TAG = "deadline"
#: Tag on every deduction message (lets other consumers filter).
DEDUCTION_TAG = "deduction"
#: Tag on a message carrying an order's payment, cancellation or expiry (same topic: one consumer applies both).
DECISION_TAG = "decision"
#: Tag of a restock's message (a transactional message like a purchase's).
RESTOCK_TAG = "restock"
#: Queues per topic: the unit of consumer parallelism.
TOPIC_QUEUES = 8
#: RocketMQ cluster name used by the local stack.
CLUSTER_NAME = "DefaultCluster"
#: Versions of the JSON body of a deduction message: 1, one purchase; 2, the purchases of a group on one
#: shard (a SKU, or one partition); 3, a group over several partitions, each purchase naming its own. A
#: body is written in the lowest version that can carry it, so an older consumer reads all it could before.
MESSAGE_VERSION = 3
MESSAGE_VERSION_ONE_SHARD = 2
#: Most purchases one deduction message may carry.
MAX_GROUP = 1024

# --- Partitioned stock (docs/scaling.md) ----------------------------------------------------------------
# A partition `sku#n` is named by its SKU, this separator and a number; `#` is not allowed in a SKU, so a
# partition's name (and its Redis keys: adapters/redis/keys.py) never meets a SKU's.
PART_SEP = "#"
#: Most partitions one SKU may have.
MAX_PARTITIONS = 64

#: Most tokens a producer keeps of a sold-out SKU's log to answer `sold_out` from memory (seal.lua): a
#: SKU with a larger log is answered from a Redis read, as before it sold out.
SEAL_MAX_TOKENS = 20_000
#: Longest a producer trusts a seal, whatever FLASHSALE_SOLD_OUT_CACHE_S says: units given back wait for a
#: seal's end (the trust plus seal.lua's margin), so no setting may keep them off sale for long.
SEAL_MAX_TRUST_S = 2.0
#: How long a producer keeps its copy of a sealed SKU's log once it no longer trusts the seal: a seal in
#: the same run reuses it (no log sent); a SKU not sealed for longer gives the memory back.
SEAL_COPY_KEEP_S = 60.0

# --- Log entry states (Redis) ------------------------------------------------------------------------
STATE_DEDUCTED = "deducted"
STATE_FENCED = "fenced"
STATE_RETURNED = "returned"
#: States of an entry whose deduction happened (a returned one happened, then was given back).
DEDUCTED_STATES = frozenset({STATE_DEDUCTED, STATE_RETURNED})

# --- Order states (a SKU sold with a payment deadline) -------------------------------------------------
#: The orders table's status for each order state of the Redis log (`created`: final on acceptance).
ORDER_STATUS = {"awaiting": "awaiting_payment", "paid": "paid", "cancelled": "cancelled", "expired": "expired"}
ORDER_FINAL = "created"

# --- Transaction record states (Redis, per half message) -----------------------------------------------
#: The message's pre-deduct ran; its record lists each purchase's outcome.
TX_RAN = "ran"
#: The checker rolled the message back before its pre-deduct ran; a late pre-deduct deducts nothing.
TX_FENCED = "fenced"
#: The pre-deduct was refused as placed by another load (or during a reload): it deducted nothing.
TX_STALE = "stale"
#: What fence.lua answers for a message too young to fence (nothing written, nothing decided).
TX_YOUNG = "young"

# --- Validation ---------------------------------------------------------------------------------------
# Patterns are applied with fullmatch (a `$` would let a trailing newline through).
#: SKUs and user ids: no braces (they would break the hash tag), no spaces, bounded length.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
#: A partition of a SKU: the SKU, `#`, a number.
PART_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}#[0-9]{1,6}")
#: Idempotency tokens: what a client-side UUID or ULID looks like, plus room for prefixes.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
#: Namespaces name topics and groups: RocketMQ allows letters, digits, '-' and '_' there.
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}")
#: A whole number written in ASCII digits (str.isdigit would also accept '²').
DIGITS = re.compile(r"[0-9]{1,18}")
#: Largest quantity one purchase may ask for.
MAX_QTY = 1_000_000
#: Largest stock of one SKU (load_stock.lua takes at most 15 digits; MySQL's BIGINT far more).
MAX_STOCK = 10**12
#: Longest payment deadline: a day, the longest a timer message may wait in RocketMQ's proxy by default.
MAX_PAY_WITHIN_MS = 86_400_000
#: The decision id of every expiry: an order expires once, whichever timer (or call) asks.
EXPIRY_DECISION = "deadline"
#: Largest per-user limit (load_stock.lua takes at most 9 digits; MySQL's INT up to 2^31-1).
MAX_PER_USER_LIMIT = 999_999_999

# --- Default ports of the local stack (all on 127.0.0.1) --------------------------------------------
DEFAULT_HOST = "127.0.0.1"
DEFAULT_REDIS_PORT = 6379
DEFAULT_MYSQL_PORT = 3306
DEFAULT_NAMESRV_PORT = 9876
DEFAULT_BROKER_PORT = 10911
DEFAULT_PROXY_GRPC_PORT = 8081
DEFAULT_PROXY_REMOTING_PORT = 8080
DEFAULT_HTTP_PORT = 8000
