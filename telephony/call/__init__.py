"""One phone call: the only place where Twilio, audio and ADK meet.

`Call` owns the call's tasks; its playback (what Twilio still holds unplayed) lives in
`playback`, its recording in `recording`."""

from .call import CALL_TASKS, Call, CallInfo, CallOptions, Handover, ModelStalled, asset
from .outcome import Outcome

__all__ = [
    "CALL_TASKS",
    "Call",
    "CallInfo",
    "CallOptions",
    "Handover",
    "ModelStalled",
    "Outcome",
    "asset",
]
