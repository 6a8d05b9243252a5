"""Log lines as JSON objects (`TELEPHONY_LOG_FORMAT=json`), for log pipelines that index
fields: each line of a call carries its `call_sid`."""

from __future__ import annotations

import datetime
import json
import logging
import re

__all__ = ["JsonFormatter"]

_CALL_LINE = re.compile(r"call (\S+?): ")
"""Lines about a call start "call CALLSID: " (see `CallLogger`), wherever they are logged."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if (call := _CALL_LINE.match(message)) is not None:
            line["call_sid"] = call.group(1)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)
