"""A logging handler that keeps the messages it is given (tests that read what a logger writes)."""

from __future__ import annotations

import logging


class CollectMessages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
