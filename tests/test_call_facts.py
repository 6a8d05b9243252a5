"""A call's facts: from Twilio's webhook form, through the stream's <Parameter>s, to state."""

from __future__ import annotations

from telephony.call import CallInfo
from telephony.twilio.twiml import call_parameters


def test_the_webhook_s_facts_ride_the_stream_and_become_session_state() -> None:
    form = {
        "CallSid": "CA1",
        "AccountSid": "AC1",
        "From": "sip:alice@pbx.example.com",
        "To": "sip:desk@example.sip.twilio.com",
        "Direction": "inbound",
        "CallStatus": "ringing",
        "SipDomain": "example.sip.twilio.com",
        "SipCallId": "a84b4c76e66710",
        "SipHeader_X-Customer": "4711",
        "SipHeader_User-Agent": "not an X- header",
        "SipSourceIp": "",
    }
    parameters = call_parameters(form)
    assert parameters == {
        "caller": "sip:alice@pbx.example.com",
        "callee": "sip:desk@example.sip.twilio.com",
        "direction": "inbound",
        "SipDomain": "example.sip.twilio.com",
        "SipCallId": "a84b4c76e66710",
        "SipHeader_X-Customer": "4711",
    }
    # the stream's start carries them back, with any custom <Parameter> of the user's TwiML
    info = CallInfo.from_parameters("CA1", {"callSid": "CA1", **parameters, "ticket": "T-9"})
    assert info.state() == {
        "telephony_call_sid": "CA1",
        "telephony_caller": "sip:alice@pbx.example.com",
        "telephony_called": "sip:desk@example.sip.twilio.com",
        "telephony_direction": "inbound",
        "telephony_sip": {
            "SipDomain": "example.sip.twilio.com",
            "SipCallId": "a84b4c76e66710",
            "SipHeader_X-Customer": "4711",
        },
        "telephony_parameters": {"ticket": "T-9"},
    }


def test_a_stream_without_our_parameters_is_an_inbound_call_from_nobody_known() -> None:
    info = CallInfo.from_parameters("CA2", {})
    assert (info.caller, info.callee, info.direction, dict(info.parameters)) == (
        "",
        "",
        "inbound",
        {},
    )
