-- Tokens, SKUs and user ids compare byte for byte, as they do in Redis: `Ab1` and `aB1` are two purchases.
-- (The server's default collations ignore case, and MySQL 8's also ignores accents.)

ALTER TABLE inventory CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
ALTER TABLE stock_deductions CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
ALTER TABLE orders CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
ALTER TABLE dead_letters CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
ALTER TABLE conflicts CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- One row per consumer process, written before it resumes after an outage: proof that the database
-- takes writes (a read-only server answers reads, and would let a consumer burn its delivery attempts).
CREATE TABLE IF NOT EXISTS heartbeats (
    name     VARCHAR(128) NOT NULL,
    seen_at  DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
