-- The number of the load the inventory row holds (Redis numbers each `stock set` under the SKU's freeze,
-- ticket.lua): a load refuses to write over a higher or equal one, so a `stock set` that stalled past its
-- freeze cannot overwrite the load that came after it. 0: loaded without a number (never by `stock set`).

ALTER TABLE inventory ADD COLUMN load_ticket BIGINT NOT NULL DEFAULT 0;
