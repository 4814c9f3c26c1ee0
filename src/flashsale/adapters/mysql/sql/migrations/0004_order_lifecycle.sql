-- The order lifecycle. An order of a SKU sold with a payment deadline awaits payment until `due_ms`
-- (Redis's clock), then ends paid, cancelled or expired, once (`decided_ms`); an order of a SKU without a
-- deadline is final on acceptance (`created`). A cancelled or expired order gives its units back: one row
-- in stock_returns, keyed like its deduction, so a redelivered decision gives nothing back twice.

ALTER TABLE orders
    ADD COLUMN due_ms BIGINT NULL,
    ADD COLUMN decided_ms BIGINT NULL;

CREATE TABLE IF NOT EXISTS stock_returns (
    sku         VARCHAR(64)  NOT NULL,
    token       VARCHAR(64)  NOT NULL,
    qty         INT          NOT NULL,
    reason      VARCHAR(16)  NOT NULL,
    message_id  VARCHAR(64)  NOT NULL,
    batch_id    CHAR(32)     NOT NULL,
    created_ms  BIGINT       NOT NULL,
    applied_at  DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (sku, token),
    KEY stock_returns_batch (batch_id),
    CONSTRAINT stock_returns_qty_positive CHECK (qty > 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
