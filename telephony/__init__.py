"""telephony: put a Google ADK live agent on the phone through Twilio Media Streams."""

__version__ = "0.1.0"
