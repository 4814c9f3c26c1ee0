from __future__ import annotations

import io
import json
import logging

from flashsale import logs


def _emit(fmt: str) -> str:
    logs.configure("INFO", process="checker", fmt=fmt)
    handler = logging.getLogger("flashsale").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    logger = logging.getLogger("flashsale.pipeline.checker")
    logger.info("check message %s -> %s", "m1", "commit", extra=logs.ids(message_id="m1", sku="s1", token="t1"))
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed for %s", "t2", extra=logs.ids(token="t2"))
    logs.configure("WARNING")
    return stream.getvalue()


def test_json_logs_write_one_object_per_line_with_the_ids_as_fields() -> None:
    lines = _emit("json").splitlines()
    first = json.loads(lines[0])
    assert first["message"] == "check message m1 -> commit"
    assert (first["message_id"], first["sku"], first["token"]) == ("m1", "s1", "t1")
    assert (first["level"], first["process"], first["logger"]) == ("INFO", "checker", "flashsale.pipeline.checker")
    second = json.loads(lines[1])
    assert second["token"] == "t2" and "sku" not in second
    assert "ValueError: boom" in second["exception"]
    assert len(lines) == 2  # the traceback stays inside its object


def test_text_logs_stay_one_line_per_event() -> None:
    text = _emit("text")
    assert "INFO checker[" in text and "check message m1 -> commit" in text


def test_ids_leave_out_what_is_not_known() -> None:
    assert logs.ids(sku="s") == {"sku": "s"}
