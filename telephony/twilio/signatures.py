"""Twilio request signatures (X-Twilio-Signature), checked against the public URL Twilio used."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator

__all__ = ["SignatureChecker", "websocket_url"]


def websocket_url(public_url: str, path: str, query: str = "") -> str:
    """The wss:// (or ws://) URL Twilio signs for a stream opened at `path`."""
    parts = urlsplit(public_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, path, query, ""))


class SignatureChecker:
    """Validates webhook and WebSocket-upgrade signatures; returns why a request fails."""

    def __init__(self, auth_token: str, public_url: str) -> None:
        self._validator = RequestValidator(auth_token)
        self._public = urlsplit(public_url)

    def _url(self, path: str, query: str, scheme: str) -> str:
        return urlunsplit((scheme, self._public.netloc, path, query, ""))

    def check_webhook(
        self, path: str, query: str, params: Mapping[str, str], signature: str | None
    ) -> str | None:
        """None when valid, otherwise the reason (for the log line)."""
        if not signature:
            return "missing X-Twilio-Signature header"
        url = self._url(path, query, self._public.scheme)
        if self._validator.validate(url, dict(params), signature):
            return None
        return f"signature does not match {url}"

    def check_websocket(self, path: str, query: str, signature: str | None) -> str | None:
        if not signature:
            return "missing X-Twilio-Signature header"
        scheme = "wss" if self._public.scheme == "https" else "ws"
        url = self._url(path, query, scheme)
        if self._validator.validate(url, {}, signature):
            return None
        return f"signature does not match {url}"

    def sign(self, url: str, params: Mapping[str, str]) -> str:
        """What Twilio would send for `url` (used by the caller simulator and tests)."""
        return self._validator.compute_signature(url, dict(params))
