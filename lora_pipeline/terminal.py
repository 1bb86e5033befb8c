"""A Dagster logger for terminals: one short line per message, tracebacks only when asked for."""

import logging
import sys
import time

import dagster as dg


class TerminalFormatter(logging.Formatter):
    """`HH:MM:SS step: message`; error events keep only their first line unless tracebacks are on."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        message = meta.get("orig_message") or record.getMessage()
        if not self.tracebacks:
            message = message.strip().split("\n", 1)[0]
        step = meta.get("step_key")
        prefix = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{prefix} {step}: {message}" if step else f"{prefix} {message}"


class _StageEvents(logging.Filter):
    """Records at the chosen level or above, plus each step's success line (a debug event in Dagster)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
        return getattr(event, "event_type_value", None) == "STEP_SUCCESS"


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, default_value="INFO", description="Lowest level shown."),
        "tracebacks": dg.Field(bool, default_value=False, description="Show full error messages and tracebacks."),
    },
    description="Concise terminal output for the lora-pipeline command.",
)
def terminal_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    """Writes to stderr, so stdout stays free for the --json summary."""
    logger = logging.Logger("lora_pipeline.terminal", level=logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_StageEvents(logging.getLevelName(init_context.logger_config["log_level"])))
    handler.setFormatter(TerminalFormatter(init_context.logger_config["tracebacks"]))
    logger.addHandler(handler)
    return logger
