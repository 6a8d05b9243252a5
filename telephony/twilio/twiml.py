"""TwiML answers for the voice webhook, built with the twilio package."""

from __future__ import annotations

from twilio.twiml.voice_response import Connect, Dial, Stream, VoiceResponse

__all__ = [
    "BUSY_MESSAGE",
    "SIP_FIELDS",
    "busy",
    "call_parameters",
    "connect_stream",
    "dial",
    "hang_up",
]

BUSY_MESSAGE = "Sorry, we cannot take your call right now. Please try again in a few minutes."


SIP_FIELDS = ("SipDomain", "SipDomainSid", "SipCallId", "SipSourceIp", "SipUsername")
"""What Twilio tells the webhook of a call to a SIP Domain, besides its `SipHeader_X-*`s."""
_CALL_FIELDS = {"From": "caller", "To": "callee", "Direction": "direction"}


def call_parameters(form: dict[str, str]) -> dict[str, str]:
    """The facts of a call from its webhook, as the stream's <Parameter>s: the stream's
    `start` carries them to whichever instance takes the stream, and the agent gets them in
    its session state. Numbers, direction, and for SIP Domain calls the SIP details and the
    custom `X-` headers (`SipHeader_X-...`)."""
    facts = {name: form[field] for field, name in _CALL_FIELDS.items() if form.get(field)}
    for field, value in form.items():
        if value and (field in SIP_FIELDS or field.startswith("SipHeader_X-")):
            facts[field] = value
    return facts


def busy(message: str = BUSY_MESSAGE) -> str:
    """What a caller hears while the server drains for a restart: a polite line, then goodbye."""
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


def connect_stream(
    stream_url: str,
    parameters: dict[str, str],
    *,
    action: str = "",
    digits: str = "",
    status_callback: str = "",
) -> str:
    """`<Connect><Stream>`: a bidirectional Media Stream; per-call values ride as <Parameter>s
    because Twilio strips the query string from the stream URL. With `action`, Twilio asks
    that URL what to do once the stream ends (a transfer, keys to press, or hang up), so the
    call needs no REST credentials for those. `digits` are played to the far end first;
    `status_callback` receives the stream's stream-started/stopped/error events."""
    if not stream_url.startswith("wss://") and not stream_url.startswith("ws://"):
        raise ValueError(f"stream URL must be wss:// (ws:// only on loopback), got {stream_url!r}")
    callback = {"status_callback": status_callback, "status_callback_method": "POST"}
    stream = Stream(url=stream_url, **(callback if status_callback else {}))
    for name, value in parameters.items():
        if value:
            stream.parameter(name=name, value=value)
    connect = Connect(action=action) if action else Connect()
    connect.append(stream)
    response = VoiceResponse()
    if digits:
        response.play(digits=digits)
    response.append(connect)
    return str(response)


def dial(target: str, caller_id: str = "") -> str:
    """Hands the caller over: `<Dial>` a number, or `<Dial><Sip>` a SIP URI; from `caller_id`
    when given (a call from a SIP Domain has no number Twilio may show to a phone)."""
    dialling = Dial(caller_id=caller_id) if caller_id else Dial()
    if target.startswith(("sip:", "sips:")):
        dialling.sip(target)
    else:
        dialling.number(target)
    response = VoiceResponse()
    response.append(dialling)
    return str(response)


def hang_up() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)
