-- The books of a flash sale. Works on MySQL 8 and MariaDB 10.11.

CREATE TABLE IF NOT EXISTS inventory (
    sku            VARCHAR(64)  NOT NULL,
    initial_stock  BIGINT       NOT NULL,
    stock          BIGINT       NOT NULL,
    per_user_limit INT          NOT NULL DEFAULT 0,
    version        BIGINT       NOT NULL DEFAULT 0,
    updated_at     DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (sku),
    CONSTRAINT inventory_stock_not_negative CHECK (stock >= 0),
    CONSTRAINT inventory_initial_not_negative CHECK (initial_stock >= 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per applied deduction; the unique (sku, token) makes every redelivery a no-op.
-- A token is unique within its SKU, as in Redis where each SKU keeps its own log.
CREATE TABLE IF NOT EXISTS stock_deductions (
    id          BIGINT       NOT NULL AUTO_INCREMENT,
    token       VARCHAR(64)  NOT NULL,
    sku         VARCHAR(64)  NOT NULL,
    user_id     VARCHAR(64)  NOT NULL,
    qty         INT          NOT NULL,
    message_id  VARCHAR(64)  NOT NULL,
    source      VARCHAR(16)  NOT NULL,
    batch_id    CHAR(32)     NOT NULL,
    created_ms  BIGINT       NOT NULL,
    applied_at  DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY stock_deductions_token (sku, token),
    KEY stock_deductions_batch (batch_id),
    CONSTRAINT stock_deductions_qty_positive CHECK (qty > 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS orders (
    id          BIGINT       NOT NULL AUTO_INCREMENT,
    token       VARCHAR(64)  NOT NULL,
    sku         VARCHAR(64)  NOT NULL,
    user_id     VARCHAR(64)  NOT NULL,
    qty         INT          NOT NULL,
    status      VARCHAR(16)  NOT NULL DEFAULT 'created',
    created_at  DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY orders_token (sku, token),
    KEY orders_user (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Messages that could not be decoded or applied for good: kept, visible, replayable.
CREATE TABLE IF NOT EXISTS dead_letters (
    id           BIGINT        NOT NULL AUTO_INCREMENT,
    message_id   VARCHAR(64)   NOT NULL,
    topic        VARCHAR(127)  NOT NULL,
    message_key  VARCHAR(255)  NULL,
    sku          VARCHAR(64)   NULL,
    reason       VARCHAR(512)  NOT NULL,
    body         MEDIUMBLOB    NOT NULL,
    received_at  DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    replayed_at  DATETIME(6)   NULL,
    PRIMARY KEY (id),
    UNIQUE KEY dead_letters_message (message_id),
    KEY dead_letters_sku (sku)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Deductions MySQL could not apply without going negative: drift for reconcile to explain.
CREATE TABLE IF NOT EXISTS conflicts (
    id           BIGINT       NOT NULL AUTO_INCREMENT,
    token        VARCHAR(64)  NOT NULL,
    sku          VARCHAR(64)  NOT NULL,
    user_id      VARCHAR(64)  NOT NULL,
    qty          INT          NOT NULL,
    message_id   VARCHAR(64)  NOT NULL,
    mysql_stock  BIGINT       NOT NULL,
    reason       VARCHAR(255) NOT NULL,
    created_at   DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    resolved_at  DATETIME(6)  NULL,
    PRIMARY KEY (id),
    UNIQUE KEY conflicts_token (sku, token)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
