"""Outbound calls through Twilio's REST API, with the official `twilio` client.

Everything that can be checked is checked before a request leaves (numbers, credentials), and
Twilio's refusals come back as `OutboundError`s that carry Twilio's status and error code in
words, never a traceback. The client is blocking; each request runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.rest import Client

from .targets import TargetError, transfer_target

__all__ = [
    "AMD_MODE",
    "STATUS_EVENTS",
    "BadNumber",
    "Credentials",
    "NoCredentials",
    "OutboundCall",
    "OutboundError",
    "place",
]

STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
AMD_MODE = "DetectMessageEnd"
"""Answering machine detection that reports a machine once its greeting (and beep) is over:
the moment to leave a message."""


class OutboundError(Exception):
    """A call that could not be placed; the message says why (Twilio's code included)."""


class BadNumber(OutboundError):
    """The number to call or to call from is not one (nothing was sent to Twilio)."""


class NoCredentials(OutboundError):
    """This server is not set up to place calls (nothing was sent to Twilio)."""


@dataclass(frozen=True)
class Credentials:
    """An account SID with either an API key and secret (preferred: revocable, scoped) or the
    account's auth token."""

    account_sid: str
    api_key: str = ""
    api_secret: str = ""
    auth_token: str = ""

    def check(self) -> None:
        if not self.account_sid.startswith("AC") or len(self.account_sid) != 34:
            raise NoCredentials("TWILIO_ACCOUNT_SID must be your account SID (AC + 32 characters)")
        if self.api_key or self.api_secret:
            if not self.api_key.startswith("SK") or not self.api_secret:
                raise NoCredentials(
                    "TWILIO_API_KEY must be an API key SID (SK...) with its TWILIO_API_SECRET"
                )
        elif not self.auth_token:
            raise NoCredentials(
                "outbound calls need TWILIO_API_KEY and TWILIO_API_SECRET, or TWILIO_AUTH_TOKEN"
            )

    def client(self, api_url: str = "") -> Client:
        if self.api_key:
            client = Client(self.api_key, self.api_secret, self.account_sid)
        else:
            client = Client(self.account_sid, self.auth_token)
        if api_url:  # a stand-in of Twilio's API (tests)
            client.api.base_url = api_url.rstrip("/")
        return client


@dataclass(frozen=True)
class OutboundCall:
    to: str
    from_: str
    webhook_url: str
    """Twilio requests it once the call is answered (our `/voice`: it connects the stream)."""
    status_callback: str
    amd_callback: str


def number(text: str, what: str) -> str:
    """An E.164 number or SIP URI, as `transfer_target` accepts; `OutboundError` otherwise."""
    try:
        return transfer_target(text)
    except TargetError as exc:
        raise BadNumber(f"{what}: {exc}") from None


async def place(call: OutboundCall, credentials: Credentials, api_url: str = "") -> str:
    """Creates the call (status callbacks and asynchronous answering machine detection on);
    returns its SID."""
    to = number(call.to, "to")
    if not call.from_:
        raise BadNumber("no caller ID: name the number to call from, or set TELEPHONY_CALLER_ID")
    from_ = number(call.from_, "from")
    credentials.check()

    def create() -> str:
        created = credentials.client(api_url).calls.create(
            to=to,
            from_=from_,
            url=call.webhook_url,
            method="POST",
            status_callback=call.status_callback,
            status_callback_event=list(STATUS_EVENTS),
            status_callback_method="POST",
            machine_detection=AMD_MODE,
            async_amd="true",
            async_amd_status_callback=call.amd_callback,
            async_amd_status_callback_method="POST",
        )
        return str(created.sid)

    try:
        return await asyncio.to_thread(create)
    except TwilioRestException as exc:
        raise OutboundError(
            f"Twilio refused the call (HTTP {exc.status}, error {exc.code}): {exc.msg}"
        ) from None
    except (TwilioException, OSError) as exc:
        raise OutboundError(f"could not reach Twilio: {exc}") from None
