"""Redis: the stock and its log. The product reaches Redis only through this package (the local stack's
probe, stack/redis_nodes.py, has a client of its own).

- keys.py: how keys are named (the templates, a SKU's or a partition's keys, partitions, holds).
- codec.py: what the clients send and how they read the replies (pure functions, shared by both).
- topology.py: one node or a cluster, routing a key to its node, which failures mean "no answer".
- stock.py: RedisStock, the synchronous client; stock_async.py: AsyncRedisStock, the producer's.
- lua/: the scripts, one per file, loaded by name.
"""
