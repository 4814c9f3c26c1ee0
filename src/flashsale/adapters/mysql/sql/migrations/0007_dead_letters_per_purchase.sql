-- A dead letter is a whole message, or one purchase of it: the purchases of a SKU MySQL does not know are
-- dead-lettered one by one, each with a body of its own, under their message's id. Keyed by the message
-- alone, a redelivery was told apart from the next purchase of the same message by nothing: the first
-- purchase's letter was kept, and the others' buyers lost their orders for good. `purchase` names the
-- token (a restock's request id) of a letter of one purchase; '' a whole message's.

ALTER TABLE dead_letters
    ADD COLUMN purchase VARCHAR(128) NOT NULL DEFAULT '',
    DROP KEY dead_letters_message,
    ADD UNIQUE KEY dead_letters_message (message_id, purchase);

-- Letters of one purchase written before: the unknown SKU's, whose key is the token (a restock's request
-- id). Named, a redelivery after the upgrade finds them rather than adding a second.
UPDATE dead_letters SET purchase = message_key WHERE reason LIKE 'unknown sku %' AND message_key IS NOT NULL;
