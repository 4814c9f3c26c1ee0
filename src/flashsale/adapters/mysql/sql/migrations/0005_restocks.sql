-- Restocks during a sale: units added to a SKU's stock, once per request id. The row is keyed like the
-- request, so a redelivered restock adds nothing twice; the units join the inventory's stock in the same
-- transaction that inserts the row.

CREATE TABLE IF NOT EXISTS stock_additions (
    sku         VARCHAR(64)  NOT NULL,
    request_id  VARCHAR(64)  NOT NULL,
    qty         INT          NOT NULL,
    message_id  VARCHAR(64)  NOT NULL,
    batch_id    CHAR(32)     NOT NULL,
    created_ms  BIGINT       NOT NULL,
    applied_at  DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (sku, request_id),
    KEY stock_additions_batch (batch_id),
    CONSTRAINT stock_additions_qty_positive CHECK (qty > 0)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
