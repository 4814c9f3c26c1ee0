-- Every statement flashsale runs, by name. Parameters are named (:name); never build SQL from input.
-- One exception: insert_deductions takes a batch's rows as literals, put in the place of its rows field
-- by store.py (_values): every string as a hexadecimal literal of its bytes, every number as digits, so
-- nothing of a row can be read as SQL. No literal brace may appear in that statement.

-- name: create_schema_version
CREATE TABLE IF NOT EXISTS schema_version (
    version     INT          NOT NULL,
    name        VARCHAR(255) NOT NULL,
    applied_at  DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (version)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4

-- name: schema_version
SELECT COALESCE(MAX(version), 0) FROM schema_version

-- name: record_version
INSERT INTO schema_version (version, name) VALUES (:version, :name)

-- name: lock_migrations
SELECT GET_LOCK('flashsale_migrations', 60)

-- name: unlock_migrations
SELECT RELEASE_LOCK('flashsale_migrations')

-- name: upsert_inventory
INSERT INTO inventory (sku, initial_stock, stock, per_user_limit, load_ticket)
VALUES (:sku, :qty, :qty, :per_user_limit, COALESCE(:ticket, 0))
ON DUPLICATE KEY UPDATE initial_stock = VALUES(initial_stock), stock = VALUES(stock),
    per_user_limit = VALUES(per_user_limit), version = version + 1,
    load_ticket = GREATEST(load_ticket, COALESCE(:ticket, load_ticket))

-- name: reserve_inventory
INSERT INTO inventory (sku, initial_stock, stock, per_user_limit) VALUES (:sku, 0, 0, 0)
ON DUPLICATE KEY UPDATE sku = sku

-- name: load_ticket
SELECT load_ticket FROM inventory WHERE sku = :sku

-- name: lock_load_tickets
SELECT sku, load_ticket FROM inventory WHERE sku IN :skus ORDER BY sku FOR UPDATE

-- name: inventory
SELECT sku, initial_stock, stock, per_user_limit, version FROM inventory WHERE sku = :sku

-- name: inventory_skus
SELECT sku FROM inventory ORDER BY sku

-- name: known_skus
SELECT sku FROM inventory WHERE sku IN :skus

-- name: lock_known_skus
SELECT sku FROM inventory WHERE sku IN :skus ORDER BY sku FOR UPDATE

-- name: deduction_count
SELECT COUNT(*) FROM stock_deductions WHERE sku = :sku

-- name: deduction_totals
SELECT COUNT(*), COALESCE(SUM(qty), 0) FROM stock_deductions WHERE sku = :sku

-- name: order_totals
SELECT COUNT(*), COALESCE(SUM(qty), 0) FROM orders WHERE sku = :sku

-- name: delete_sku_history
DELETE FROM stock_deductions WHERE sku = :sku

-- name: delete_sku_orders
DELETE FROM orders WHERE sku = :sku

-- name: delete_sku_conflicts
DELETE FROM conflicts WHERE sku = :sku

-- name: insert_deductions
INSERT INTO stock_deductions (token, sku, user_id, qty, message_id, source, batch_id, created_ms)
VALUES {rows}
ON DUPLICATE KEY UPDATE token = token

-- name: count_batch_deductions
SELECT COUNT(*) FROM stock_deductions WHERE batch_id = :batch_id

-- name: batch_deduction_keys
SELECT sku, token FROM stock_deductions WHERE batch_id = :batch_id

-- name: deduct_stock
UPDATE inventory SET stock = stock - :total, version = version + 1 WHERE sku = :sku AND stock >= :total

-- name: stock_for_update
SELECT stock FROM inventory WHERE sku = :sku FOR UPDATE

-- name: delete_deductions
DELETE FROM stock_deductions WHERE batch_id = :batch_id AND sku = :sku AND token IN :tokens

-- name: insert_orders
INSERT INTO orders (token, sku, user_id, qty)
SELECT token, sku, user_id, qty FROM stock_deductions WHERE sku = :sku AND token IN :tokens
ON DUPLICATE KEY UPDATE token = orders.token

-- name: insert_batch_orders
INSERT INTO orders (token, sku, user_id, qty)
SELECT token, sku, user_id, qty FROM stock_deductions WHERE batch_id = :batch_id AND sku = :sku
ON DUPLICATE KEY UPDATE token = orders.token

-- name: insert_conflict
INSERT INTO conflicts (token, sku, user_id, qty, message_id, mysql_stock, reason)
VALUES (:token, :sku, :user_id, :qty, :message_id, :mysql_stock, :reason)
ON DUPLICATE KEY UPDATE mysql_stock = VALUES(mysql_stock), reason = VALUES(reason), resolved_at = NULL

-- name: resolve_batch_conflicts
UPDATE conflicts c JOIN stock_deductions d ON d.sku = c.sku AND d.token = c.token
SET c.resolved_at = CURRENT_TIMESTAMP(6)
WHERE d.batch_id = :batch_id AND d.sku = :sku AND c.resolved_at IS NULL

-- name: insert_dead_letter
INSERT INTO dead_letters (message_id, purchase, topic, message_key, sku, reason, body)
VALUES (:message_id, :purchase, :topic, :message_key, :sku, :reason, :body)
ON DUPLICATE KEY UPDATE message_id = message_id

-- name: ping
SELECT 1

-- name: existing_tokens
SELECT token FROM stock_deductions WHERE sku = :sku AND token IN :tokens

-- name: deductions_page
-- With the load the rows belong to: one statement reads both as of one moment (a load deletes a reset
-- SKU's rows and writes its number in one transaction).
SELECT d.id, d.token, d.user_id, d.qty, d.message_id, d.created_ms, o.status, o.due_ms, o.decided_ms,
    i.load_ticket
FROM stock_deductions d
JOIN inventory i ON i.sku = d.sku
LEFT JOIN orders o ON o.sku = d.sku AND o.token = d.token
WHERE d.sku = :sku AND d.id > :after ORDER BY d.id LIMIT :limit

-- name: orders_without_deduction
SELECT COUNT(*) FROM orders o LEFT JOIN stock_deductions d ON d.sku = o.sku AND d.token = o.token
WHERE o.sku = :sku AND d.id IS NULL

-- name: deductions_without_order
SELECT COUNT(*) FROM stock_deductions d LEFT JOIN orders o ON o.sku = d.sku AND o.token = d.token
WHERE d.sku = :sku AND o.id IS NULL

-- name: open_dead_letters
SELECT COUNT(*) FROM dead_letters WHERE sku = :sku AND replayed_at IS NULL

-- name: open_conflicts
SELECT COUNT(*), COALESCE(SUM(qty), 0) FROM conflicts WHERE sku = :sku AND resolved_at IS NULL

-- name: ordered_in_batch
SELECT token FROM orders
WHERE sku = :sku AND token IN (SELECT token FROM stock_deductions WHERE batch_id = :batch_id AND sku = :sku)

-- name: create_missing_orders
INSERT INTO orders (token, sku, user_id, qty)
SELECT d.token, d.sku, d.user_id, d.qty FROM stock_deductions d
LEFT JOIN orders o ON o.sku = d.sku AND o.token = d.token
WHERE d.sku = :sku AND o.id IS NULL

-- name: dead_letters_page
SELECT id, message_id, topic, message_key, sku, reason, body FROM dead_letters
WHERE replayed_at IS NULL AND id > :after ORDER BY id LIMIT :limit

-- name: sku_dead_letters_page
SELECT id, message_id, topic, message_key, sku, reason, body FROM dead_letters
WHERE replayed_at IS NULL AND sku = :sku AND id > :after ORDER BY id LIMIT :limit

-- name: mark_dead_letters_replayed
UPDATE dead_letters SET replayed_at = CURRENT_TIMESTAMP(6) WHERE id IN :ids

-- name: lock_stock
SELECT stock, per_user_limit FROM inventory WHERE sku = :sku FOR UPDATE

-- name: read_stock_version
SELECT stock, version, per_user_limit FROM inventory WHERE sku = :sku

-- name: take_stock
UPDATE inventory SET stock = stock - :qty, version = version + 1 WHERE sku = :sku

-- name: take_stock_at_version
UPDATE inventory SET stock = stock - :qty, version = version + 1
WHERE sku = :sku AND version = :version AND stock >= :qty

-- name: user_bought
SELECT COALESCE(SUM(qty), 0) FROM orders WHERE sku = :sku AND user_id = :user_id

-- name: insert_one_deduction
INSERT INTO stock_deductions (token, sku, user_id, qty, message_id, source, batch_id, created_ms)
VALUES (:token, :sku, :user_id, :qty, :source, :source, '', :created_ms)

-- name: insert_one_order
INSERT INTO orders (token, sku, user_id, qty) VALUES (:token, :sku, :user_id, :qty)

-- name: applied_qty
SELECT COUNT(*), COALESCE(SUM(qty), 0) FROM stock_deductions WHERE sku IN :skus

-- name: heartbeat
INSERT INTO heartbeats (name) VALUES (:name) ON DUPLICATE KEY UPDATE seen_at = CURRENT_TIMESTAMP(6)

-- name: stock_of
SELECT stock FROM inventory WHERE sku = :sku

-- name: set_order_states
UPDATE orders SET status = :status, due_ms = :due_ms, decided_ms = :decided_ms
WHERE sku = :sku AND token = :token AND status IN ('created', 'awaiting_payment')

-- name: insert_returns
INSERT INTO stock_returns (sku, token, qty, reason, message_id, batch_id, created_ms)
SELECT sku, token, qty, :reason, :message_id, :batch_id, :created_ms FROM stock_deductions
WHERE sku = :sku AND token = :token
ON DUPLICATE KEY UPDATE token = stock_returns.token

-- name: batch_returns
SELECT sku, SUM(qty) AS qty FROM stock_returns WHERE batch_id = :batch_id GROUP BY sku ORDER BY sku

-- name: give_stock_back
UPDATE inventory SET stock = stock + :total, version = version + 1 WHERE sku = :sku

-- name: return_totals
SELECT COUNT(*), COALESCE(SUM(qty), 0) FROM stock_returns WHERE sku = :sku

-- name: order_states
SELECT status, COUNT(*), COALESCE(SUM(qty), 0) FROM orders WHERE sku = :sku GROUP BY status

-- name: delete_sku_returns
DELETE FROM stock_returns WHERE sku = :sku

-- name: order_facts
SELECT d.token, o.status, r.token IS NOT NULL AS returned
FROM stock_deductions d
LEFT JOIN orders o ON o.sku = d.sku AND o.token = d.token
LEFT JOIN stock_returns r ON r.sku = d.sku AND r.token = d.token
WHERE d.sku = :sku AND d.token IN :tokens

-- name: insert_additions
INSERT INTO stock_additions (sku, request_id, qty, message_id, batch_id, created_ms)
VALUES (:sku, :request_id, :qty, :message_id, :batch_id, :created_ms)
ON DUPLICATE KEY UPDATE request_id = stock_additions.request_id

-- name: batch_additions
SELECT sku, SUM(qty) AS qty FROM stock_additions WHERE batch_id = :batch_id GROUP BY sku ORDER BY sku

-- name: addition_totals
SELECT COUNT(*), COALESCE(SUM(qty), 0) FROM stock_additions WHERE sku = :sku

-- name: sku_additions
SELECT request_id, qty, created_ms FROM stock_additions WHERE sku = :sku

-- name: delete_sku_additions
DELETE FROM stock_additions WHERE sku = :sku
