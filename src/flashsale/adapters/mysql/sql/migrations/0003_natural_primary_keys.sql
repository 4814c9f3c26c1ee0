-- Deductions and orders are clustered on their natural key (sku, token); `id` stays, as arrival order.
-- With the unique key secondary, a duplicate insert (a redelivery, two consumers on one message) rolled
-- back its clustered row, and InnoDB handed that row's lock on as a gap lock on the end of the table:
-- two consumers each holding one then deadlocked on their next inserts, whatever order they took.
-- A duplicate of the clustered key itself takes a lock on that key alone, and batches insert in key order.

ALTER TABLE stock_deductions
    DROP PRIMARY KEY,
    ADD PRIMARY KEY (sku, token),
    ADD KEY stock_deductions_id (id),
    DROP KEY stock_deductions_token;

ALTER TABLE orders
    DROP PRIMARY KEY,
    ADD PRIMARY KEY (sku, token),
    ADD KEY orders_id (id),
    DROP KEY orders_token;
