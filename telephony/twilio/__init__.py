"""Twilio's side of a call: the Media Streams codec (pure, h11-style: messages in, events
out), the TwiML we answer with, and request signatures."""
