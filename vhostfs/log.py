"""The one structlog configuration of the process.

Human console lines on stderr by default; ``fmt="json"`` gives one JSON object per line
(journald, log collectors); ``syslog=True`` sends each line to syslog(3) (facility
daemon, ident ``vhostfs``) with the priority of its level instead of stderr.
"""
from __future__ import annotations

import logging
import sys
import syslog as _syslog

import structlog

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": logging.CRITICAL + 10,
}

_SYSLOG_PRIORITY = {
    "debug": _syslog.LOG_DEBUG, "info": _syslog.LOG_INFO, "warning": _syslog.LOG_WARNING,
    "warn": _syslog.LOG_WARNING, "error": _syslog.LOG_ERR, "exception": _syslog.LOG_ERR,
    "critical": _syslog.LOG_CRIT,
}


class SyslogLogger:
    """A structlog logger that hands each rendered line to syslog(3)."""

    def __init__(self, send=None) -> None:
        self._send = send

    def msg(self, message: str, *, _level: str = "info") -> None:
        send = self._send or _syslog.syslog
        for line in str(message).splitlines() or [""]:   # syslog lines cannot hold newlines
            send(_SYSLOG_PRIORITY.get(_level, _syslog.LOG_INFO), line)

    def _method(level):  # noqa: N805 - builds the level methods below
        def method(self, message: str) -> None:
            self.msg(message, _level=level)
        return method

    debug = _method("debug")
    info = _method("info")
    warning = warn = _method("warning")
    error = _method("error")
    exception = _method("exception")
    critical = fatal = _method("critical")
    log = msg
    del _method


def _syslog_factory(*_args) -> SyslogLogger:
    return SyslogLogger()


def configure(level: str = "info", fmt: str = "console", *, syslog: bool = False) -> None:
    """Configure structlog for the whole process (stderr or syslog; console or JSON)."""
    numeric = LEVELS[level.lower()]
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback)
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if not syslog:   # syslog stamps its own time
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [
        structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
        renderer,
    ]
    if syslog:
        _syslog.openlog("vhostfs", _syslog.LOG_PID, _syslog.LOG_DAEMON)
        factory = _syslog_factory
    else:
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str):
    return structlog.get_logger(name)
