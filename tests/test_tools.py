"""Call tools: ADK's LiveKit names, offered on phone calls only, with refusals the model can
relay; and the checks on where a caller may be sent and which keys may be pressed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from google.adk.agents.run_config import RunConfig
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService

from telephony.agents.echo import echo_app
from telephony.call import Call, CallInfo, CallOptions, Handover
from telephony.call.tools import (
    PhoneToolset,
    end_call,
    register,
    send_dtmf,
    transfer_call,
    unregister,
)
from telephony.settings import Settings, SettingsError
from telephony.testing.virtual_clock import run_virtual
from telephony.twilio.targets import AllowList, TargetError, key_digits, transfer_target


class FakeCall:
    """What the tools see of a call; the real one is exercised through the server."""

    def __init__(self, allow: str = "") -> None:
        self.allow = AllowList.parse(allow)
        self.done: list[str] = []

    @property
    def transfers_allowed(self) -> bool:
        return bool(self.allow)

    def end_after_reply(self) -> None:
        self.done.append("end")

    def transfer(self, target: str) -> str:
        checked = transfer_target(target)
        if not self.allow.allows(checked):
            raise TargetError(f"transfers to {target} are not allowed")
        self.done.append(checked)
        return checked

    def press_keys(self, digits: str) -> str:
        self.done.append(key_digits(digits))
        return digits


def _tools(state: dict[str, Any]) -> list[str]:
    context: Any = SimpleNamespace(state=state)
    return [tool.name for tool in asyncio.run(PhoneToolset().get_tools(context))]


def _on(call_sid: str) -> Any:
    return SimpleNamespace(session=SimpleNamespace(id=call_sid))


def test_the_tools_are_offered_on_phone_calls_only() -> None:
    assert _tools({}) == []  # `adk web`: no call to act on
    assert _tools({"telephony_call_sid": "CA1"}) == []  # not (or no longer) on this process
    one, two = FakeCall(), FakeCall(allow="+15557654321")
    register("CA1", one)
    register("CA2", two)
    try:
        assert _tools({"telephony_call_sid": "CA1"}) == ["end_call", "send_dtmf"]
        assert _tools({"telephony_call_sid": "CA2"}) == ["end_call", "send_dtmf", "transfer_call"]
        unregister("CA2", FakeCall())  # an older call under the same SID: not this one
        assert _tools({"telephony_call_sid": "CA2"}) != []
    finally:
        unregister("CA1", one)
        unregister("CA2", two)


def test_each_tool_acts_on_its_own_call_or_says_why_it_cannot() -> None:
    assert asyncio.run(end_call(_on("CA1"))) == "There is no phone call to end."
    call = FakeCall(allow="+1555*")
    register("CA1", call)
    try:
        assert "ending" in asyncio.run(end_call(_on("CA1")))
        said = asyncio.run(transfer_call("+1 (555) 765-4321", _on("CA1")))
        assert said == "Transferring the caller to +15557654321 once they have heard you."
        refused = asyncio.run(transfer_call("+442071234567", _on("CA1")))
        assert refused == "Could not transfer the call: transfers to +442071234567 are not allowed."
        assert "international form" in asyncio.run(transfer_call("the front desk", _on("CA1")))
        assert asyncio.run(send_dtmf("1w2#", _on("CA1"))) == "Sent the tones 1w2#."
        assert "0-9, * and #" in asyncio.run(send_dtmf("12ab", _on("CA1")))
    finally:
        unregister("CA1", call)
    assert call.done == ["end", "+15557654321", "1w2#"]


@pytest.mark.parametrize(
    ("entry", "allowed", "refused"),
    [
        ("+15557654321", "+15557654321", "+15557654322"),
        ("+1800*", "+18005550100", "+18015550100"),
        ("@example.com", "sip:desk@example.com", "sip:desk@example.org"),
        ("sip:desk@example.com", "sip:desk@example.com", "sip:other@example.com"),
    ],
)
def test_the_allow_list_takes_numbers_prefixes_sip_uris_and_domains(
    entry: str, allowed: str, refused: str
) -> None:
    allow = AllowList.parse(entry)
    assert allow.allows(allowed)
    assert not allow.allows(refused)


@pytest.mark.parametrize("bad", ["12345", "+0123456789", "sip:nohost", "tel:", "+1555abc4567"])
def test_a_target_that_is_neither_e164_nor_a_sip_uri_is_refused(bad: str) -> None:
    with pytest.raises(TargetError):
        transfer_target(bad)


@pytest.mark.parametrize("bad", ["", "12a", "1 2", "#" * 65])
def test_keys_outside_0_9_star_hash_and_pauses_are_refused(bad: str) -> None:
    with pytest.raises(TargetError):
        key_digits(bad)


def test_transfer_settings_are_checked_at_start_up() -> None:
    assert Settings.from_env({"TELEPHONY_TRANSFER_TO": "+15557654321"}).transfers()
    with pytest.raises(SettingsError, match="TRANSFER"):
        Settings.from_env({"TELEPHONY_TRANSFER_TO": "reception"})
    with pytest.raises(SettingsError, match="not in TELEPHONY_TRANSFER_ALLOW"):
        Settings.from_env(
            {"TELEPHONY_TRANSFER_TO": "+15557654321", "TELEPHONY_TRANSFER_ALLOW": "@example.com"}
        )
    with pytest.raises(SettingsError, match="prefix"):
        Settings.from_env({"TELEPHONY_TRANSFER_ALLOW": "+1800**"})


def test_one_handover_at_a_time_and_none_while_keys_are_pressed() -> None:
    async def main() -> list[str]:
        runner = Runner(app=echo_app(), session_service=InMemorySessionService())
        options = CallOptions(transfer_allow=AllowList.parse("+1555*"))
        call = Call(
            CallInfo("CA1", "+1", "+2"), runner=runner, run_config=RunConfig(), options=options
        )
        refusals = []
        call.transfer("+15557654321")
        call.end_after_reply()  # "goodbye", after asking for the transfer: it still happens
        for act in (lambda: call.press_keys("1"), lambda: call.transfer("+15550000000")):
            with pytest.raises(TargetError) as refused:
                act()
            refusals.append(str(refused.value))
        call._leave()  # the handover line was heard
        assert call.handover == Handover(transfer_to="+15557654321", caller_id="+2")
        return refusals

    assert run_virtual(main()) == ["a transfer or key press is already under way"] * 2
