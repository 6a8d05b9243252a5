"""How a call ended, in few enough kinds to count calls by: the log and the recording keep
the full reason (`Call.end_reason`), which names targets and errors."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Outcome"]


class Outcome(StrEnum):
    HUNG_UP = "hung_up"
    """The caller (or, on an outbound call, the person called) hung up."""
    AGENT_ENDED = "agent_ended"
    """The agent's `end_call`, once its goodbye was heard."""
    TRANSFERRED = "transferred"
    TIME_LIMIT = "time_limit"
    CALLER_IDLE = "caller_idle"
    """The caller stayed silent after being asked whether they were still there."""
    FAX = "fax"
    MODEL_FAILED = "model_failed"
    """The live session failed for good (the caller heard the apology) or ended by itself."""
    STREAM_ERROR = "stream_error"
    """The media stream closed without Twilio's `stop`, or Twilio stopped taking our writes."""
    NO_STREAM = "no_stream"
    """No media stream came: after the webhook, or after Twilio pressed the agent's keys."""
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    REFUSED = "refused"
    """Turned away at the webhook (busy, shutting down): it never became a `Call`."""
