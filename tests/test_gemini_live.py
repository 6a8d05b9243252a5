"""The Gemini Live stand-in: its VAD, its wire behaviour, its faults, and that the real clients
(google-genai, ADK's run_live) talk to it unchanged."""

from __future__ import annotations

import asyncio
import audioop
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webrtcvad
from google import genai
from google.adk.agents import LlmAgent
from google.adk.agents.live_request_queue import LiveRequestQueue
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.apps import App
from google.adk.models import Gemini
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService
from google.genai import types
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from telephony.testing.gemini_live import (
    ContextTurn,
    FaultPlan,
    GeminiLiveService,
    ServiceBehaviour,
    SpeechDetector,
    resample,
    running_in_thread,
    voiced_audio,
)

MODEL_25 = "gemini-2.5-flash-native-audio-preview-12-2025"
MODEL_3 = "gemini-3.1-flash-live-preview"
FIXTURES = Path(__file__).parent / "fixtures"
SILENCE = bytes(16000 * 2)
"""One second of 16 kHz silence."""
SETUP = {
    "model": f"models/{MODEL_25}",
    "generationConfig": {"responseModalities": ["AUDIO"]},
    "sessionResumption": {},
    "inputAudioTranscription": {},
    "outputAudioTranscription": {},
    "contextWindowCompression": {"sliding_window": {}},
}


# --- the VAD ----------------------------------------------------------------------------------


def _vad_events(pcm: bytes) -> list[tuple[str, float, float]]:
    """(kind, audio time of the event, utterance seconds) for 20 ms chunks fed in order."""
    vad, events = SpeechDetector(), []
    for i in range(0, len(pcm), 640):
        for event in vad.feed(pcm[i : i + 640]):
            events.append((event.kind, (i + 640) / 32000, len(event.pcm) / 32000))
    return events


def _noise(seconds: float, dbfs: float) -> bytes:
    x = np.random.default_rng(7).standard_normal(int(seconds * 16000)) * 32768 * 10 ** (dbfs / 20)
    return x.astype("<i2").tobytes()


def test_vad_starts_after_200_ms_of_voice_and_ends_after_600_ms_of_silence() -> None:
    events = _vad_events(SILENCE + voiced_audio(1.0, 16000) + SILENCE)
    assert [e[0] for e in events] == ["start", "end"]
    assert events[0][1] == pytest.approx(1.2, abs=0.03)
    assert events[1][1] == pytest.approx(2.6, abs=0.03)
    assert events[1][2] == pytest.approx(1.0, abs=0.03)


def test_vad_hears_recorded_speech_as_one_utterance() -> None:
    mulaw = (FIXTURES / "stop.ulaw").read_bytes()  # "Wait, stop, that is not what I asked."
    speech = resample(audioop.ulaw2lin(mulaw, 2), 8000, 16000)
    events = _vad_events(SILENCE + speech + SILENCE)
    assert [e[0] for e in events] == ["start", "end"]
    assert 2.0 < events[1][2] <= len(speech) / 32000


@pytest.mark.parametrize(
    "audio",
    [
        pytest.param(SILENCE * 2, id="silence"),
        pytest.param(_noise(2.0, -78), id="hiss-78dBFS"),
        pytest.param(SILENCE + _noise(0.5, -30) + SILENCE, id="loud-hiss"),
        pytest.param(SILENCE + voiced_audio(0.15, 16000, -15) + SILENCE, id="cough-150ms"),
    ],
)
def test_vad_ignores_silence_hiss_and_short_bursts(audio: bytes) -> None:
    assert _vad_events(audio) == []


def test_vad_noise_floor_adapts_to_a_steady_hum() -> None:
    rng = np.random.default_rng(3)
    hum = np.cumsum(rng.standard_normal(16000 * 7))
    hum -= np.convolve(hum, np.ones(400) / 400, "same")
    hum *= 32768 * 10 ** (-40 / 20) / hum.std()
    voice = np.frombuffer(voiced_audio(1.0, 16000), "<i2") + hum[-16000:]
    audio = hum.astype("<i2").tobytes() + voice.astype("<i2").tobytes() + SILENCE
    kinds = [(kind, round(at)) for kind, at, _ in _vad_events(audio)]
    assert kinds[-2:] == [("start", 7), ("end", 9)]
    assert len(kinds) <= 4  # the hum may count as speech only until the floor catches up


def test_synthetic_voice_is_speech_to_webrtcvad() -> None:
    pcm = resample(voiced_audio(2.0), 24000, 16000)
    vad = webrtcvad.Vad(3)
    frames = [vad.is_speech(pcm[i : i + 640], 16000) for i in range(0, len(pcm) - 640, 640)]
    assert np.mean(frames) > 0.9


def test_behaviour_keeps_timings_in_the_real_service_range() -> None:
    assert ServiceBehaviour().chunk_bytes == 1920
    with pytest.raises(ValueError, match="vad_end_s"):
        ServiceBehaviour(vad_end_s=0.3)
    with pytest.raises(ValueError, match="reply_speed"):
        ServiceBehaviour(reply_speed=10)


# --- a raw WebSocket client -------------------------------------------------------------------


class Client:
    """Collects every frame the service sends, with its arrival time."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append((time.monotonic(), json.loads(raw)))
        except ConnectionClosed:
            pass

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def speak(self, pcm: bytes, form: str = "mediaChunks") -> None:
        """Audio as google-genai sends it (URL-safe base64), in 20 ms chunks, in a burst: the
        service's VAD runs on audio time, not wall time."""
        for i in range(0, len(pcm), 640):
            blob = {
                "mimeType": "audio/pcm;rate=16000",
                "data": base64.urlsafe_b64encode(pcm[i : i + 640]).decode(),
            }
            body = {"mediaChunks": [blob]} if form == "mediaChunks" else {"audio": blob}
            await self.send(realtime_input=body)

    async def say(self, text: str) -> None:
        turn = {"role": "user", "parts": [{"text": text}]}
        await self.send(client_content={"turns": [turn], "turn_complete": True})

    def kinds(self) -> list[str]:
        return [_kind(frame) for _, frame in self.frames]

    def count(self, kind: str) -> int:
        return self.kinds().count(kind)

    async def until(self, kind: str, count: int = 1, timeout: float = 5.0) -> None:
        await _poll(lambda: self.count(kind) >= count, timeout)

    async def closed(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.reader, timeout)

    def audio(self) -> bytes:
        return b"".join(
            base64.b64decode(f["serverContent"]["modelTurn"]["parts"][0]["inlineData"]["data"])
            for _, f in self.frames
            if _kind(f) == "modelTurn"
        )

    def text(self, kind: str) -> str:
        return "".join(f["serverContent"][kind]["text"] for _, f in self.frames if _kind(f) == kind)


def _kind(frame: dict[str, Any]) -> str:
    key = next(iter(frame))
    return next(iter(frame[key])) if key == "serverContent" else key


async def _poll(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def raw_client(
    service: GeminiLiveService,
    setup: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
    version: str = "v1alpha",
) -> AsyncIterator[Client]:
    headers = {"x-goog-api-key": "standin-key"} if headers is None else headers
    async with connect(
        service.url(version), ssl=service.ssl_context(), additional_headers=headers
    ) as ws:
        client = Client(ws)
        if setup is not None:
            await client.send(setup=setup)
            await client.until("setupComplete")
        yield client


@pytest.fixture
async def service() -> AsyncIterator[GeminiLiveService]:
    async with GeminiLiveService() as running:
        yield running


SPEECH = voiced_audio(1.0, 16000) + SILENCE
"""One second of voice then enough silence for the service's VAD to end the turn."""


# --- turns ------------------------------------------------------------------------------------


async def test_speech_gets_a_transcript_then_its_echo_faster_than_real_time(
    service: GeminiLiveService,
) -> None:
    async with raw_client(service, SETUP) as client:
        await client.speak(SPEECH)
        await client.until("turnComplete")
        await client.until("sessionResumptionUpdate", 3)
    kinds = [
        k
        for k in client.kinds()
        if k not in ("modelTurn", "outputTranscription", "inputTranscription")
    ]
    assert kinds == [
        "setupComplete",
        "sessionResumptionUpdate",
        "sessionResumptionUpdate",
        "generationComplete",
        "turnComplete",
        "sessionResumptionUpdate",
    ]
    # the transcript starts before the reply; its last words come late, as the service's do
    heard = [t for t, f in client.frames if _kind(f) == "inputTranscription"]
    first_reply = next(t for t, f in client.frames if _kind(f) == "modelTurn")
    assert len(heard) == 2
    assert heard[0] <= first_reply
    assert heard[1] - heard[0] >= ServiceBehaviour().transcription_lag_s - 0.02
    updates = [
        f["sessionResumptionUpdate"] for _, f in client.frames if "sessionResumptionUpdate" in f
    ]
    assert updates[1] == {"resumable": False}
    assert updates[2]["resumable"] and updates[2]["newHandle"] != updates[0]["newHandle"]
    assert client.text("inputTranscription") == "(caller speech 1.0 s)"
    assert client.text("outputTranscription") == "(echo of 1.0 s of caller speech)"
    done = next(f for _, f in client.frames if _kind(f) == "turnComplete")
    assert set(done["usageMetadata"]) == {
        "promptTokenCount",
        "responseTokenCount",
        "totalTokenCount",
    }

    chunks = [(t, f) for t, f in client.frames if _kind(f) == "modelTurn"]
    parts = [f["serverContent"]["modelTurn"]["parts"][0]["inlineData"] for _, f in chunks]
    assert {p["mimeType"] for p in parts} == {"audio/pcm;rate=24000"}
    assert {len(base64.b64decode(p["data"])) for p in parts[:-1]} == {1920}
    echo = np.frombuffer(client.audio(), "<i2").astype(float)
    sent = np.frombuffer(resample(voiced_audio(1.0, 16000), 16000, 24000), "<i2").astype(float)
    assert len(echo) == pytest.approx(len(sent), abs=480)
    n = min(len(echo), len(sent))
    assert np.corrcoef(echo[:n], sent[:n])[0, 1] > 0.99
    speed = 1.0 / (chunks[-1][0] - chunks[0][0])
    assert 2.0 <= speed <= 4.5
    # transcript pieces are spread over the audio, not sent at the end
    first_piece = client.kinds().index("outputTranscription")
    assert first_piece < len(client.kinds()) - 10
    record = service.connections[0]
    assert record.audio_s == pytest.approx(2.0)
    assert [t.role for t in record.context] == ["user", "model"]
    assert record.context[1].audio_s == pytest.approx(1.0, abs=0.04)


async def test_a_text_turn_gets_a_voiced_reply_derived_from_it(service: GeminiLiveService) -> None:
    async with raw_client(service, SETUP) as client:
        await client.say("(The caller pressed 5 on the keypad.)")
        await client.until("turnComplete")
    assert service.connections[0].text_turns == ["(The caller pressed 5 on the keypad.)"]
    assert client.text("outputTranscription") == "(reply to: The caller pressed 5 on the keypad.)"
    reply = client.audio()
    assert 0.5 <= len(reply) / 48000 <= 2.0
    pcm = resample(reply, 24000, 16000)
    vad = webrtcvad.Vad(2)
    assert (
        np.mean([vad.is_speech(pcm[i : i + 640], 16000) for i in range(0, len(pcm) - 640, 640)])
        > 0.9
    )


async def test_caller_speech_while_generating_interrupts(service: GeminiLiveService) -> None:
    async with raw_client(service, SETUP) as client:
        await client.say("Tell me a long story about the sea, the ships and the sailors.")
        await client.until("modelTurn")
        await client.speak(voiced_audio(0.3, 16000))
        await client.until("turnComplete")
        await client.until("sessionResumptionUpdate", 3)
        tail = [k for k in client.kinds() if k not in ("modelTurn", "outputTranscription")]
        assert tail[-3:] == ["interrupted", "turnComplete", "sessionResumptionUpdate"]
        assert "generationComplete" not in tail
        generated = len(client.audio()) / 48000
        assert generated < 1.5
        # what it generated stays in its context, heard or not
        model_turn = service.connections[0].context[-1]
        assert model_turn.role == "model"
        assert model_turn.audio_s == pytest.approx(generated, abs=0.001)
        # the caller's interrupting utterance is then answered in full
        await client.speak(SILENCE)
        await client.until("turnComplete", 2)
        await client.until("inputTranscription", 2)  # its last words come late
    assert client.count("generationComplete") == 1
    assert client.text("inputTranscription") == "(caller speech 0.3 s)"


async def test_speech_after_generation_finished_is_a_new_turn_not_an_interruption(
    service: GeminiLiveService,
) -> None:
    async with raw_client(service, SETUP) as client:
        await client.say("Hello")
        await client.until("turnComplete")
        await client.speak(SPEECH)
        await client.until("turnComplete", 2)
    assert client.count("interrupted") == 0
    assert client.count("generationComplete") == 2


@pytest.mark.parametrize(("model", "interrupts"), [(MODEL_3, True), (MODEL_25, False)])
async def test_text_turn_while_generating_interrupts_only_on_3x(
    service: GeminiLiveService, model: str, interrupts: bool
) -> None:
    async with raw_client(service, {**SETUP, "model": f"models/{model}"}) as client:
        await client.say("Tell me a long story about the sea, the ships and the sailors.")
        await client.until("modelTurn")
        await client.say("(The caller pressed 5 on the keypad.)")
        await client.until("turnComplete", 2)
    assert client.count("interrupted") == int(interrupts)
    assert client.count("generationComplete") == 2 - int(interrupts)


async def test_history_before_realtime_input_is_not_answered(service: GeminiLiveService) -> None:
    setup = {**SETUP, "historyConfig": {"initial_history_in_client_content": True}}
    async with raw_client(service, setup) as client:
        await client.say("What did I ask before?")
        await asyncio.sleep(0.2)
        assert client.count("modelTurn") == 0
        await client.send(realtime_input={"text": "."})
        await client.until("turnComplete")
    assert service.connections[0].text_turns == ["What did I ask before?", "."]


@pytest.mark.parametrize("form", ["mediaChunks", "audio"])
async def test_both_realtime_audio_forms_are_heard(service: GeminiLiveService, form: str) -> None:
    async with raw_client(service, SETUP) as client:
        await client.speak(SPEECH, form)
        await client.until("turnComplete")
    assert service.connections[0].input_forms == {form}
    assert len(client.audio()) == pytest.approx(48000, abs=1920)


async def test_audio_stream_end_ends_the_utterance_at_once(service: GeminiLiveService) -> None:
    async with raw_client(service, SETUP) as client:
        await client.speak(voiced_audio(1.0, 16000))
        await asyncio.sleep(0.1)
        assert client.count("inputTranscription") == 0
        await client.send(realtime_input={"audioStreamEnd": True})
        await client.until("turnComplete")
    record = service.connections[0]
    assert record.audio_stream_ends == 1
    assert record.input_forms == {"mediaChunks", "audioStreamEnd"}


async def test_explicit_activity_signals_drive_turns_only_without_automatic_detection(
    service: GeminiLiveService,
) -> None:
    async with raw_client(service, SETUP) as client:
        await client.send(realtime_input={"activityStart": {}})
        await client.closed()
    assert client.ws.close_code == 1007
    manual = {**SETUP, "realtimeInputConfig": {"automatic_activity_detection": {"disabled": True}}}
    async with raw_client(service, manual) as client:
        await client.speak(SPEECH)  # the service's VAD is off: no turn
        await asyncio.sleep(0.1)
        assert client.count("inputTranscription") == 0
        await client.send(realtime_input={"activityStart": {}})
        await client.speak(SILENCE[:16000])
        await client.send(realtime_input={"activityEnd": {}})
        await client.until("turnComplete")
        await client.until("inputTranscription", 2)  # its last words come late
    assert client.text("inputTranscription") == "(caller speech 0.5 s)"


# --- session resumption -----------------------------------------------------------------------


async def test_a_handle_restores_the_context_and_an_unknown_one_is_refused(
    service: GeminiLiveService,
) -> None:
    async with raw_client(service, SETUP) as client:
        await client.say("My name is Ada.")
        await client.until("sessionResumptionUpdate", 3)
    handle = client.frames[-1][1]["sessionResumptionUpdate"]["newHandle"]
    resumed = {**SETUP, "sessionResumption": {"handle": handle}}
    async with raw_client(service, resumed):
        pass
    first, second = service.connections[:2]
    assert second.resumed_handle == handle
    assert second.context == first.context
    assert second.context[0] == ContextTurn("user", "My name is Ada.")

    unknown = {**SETUP, "sessionResumption": {"handle": "no-such-handle"}}
    async with raw_client(service) as client:
        await client.send(setup=unknown)
        await client.closed()
    assert client.ws.close_code == 1007
    assert client.count("setupComplete") == 0


# --- faults -----------------------------------------------------------------------------------


async def test_go_away_when_idle_after_a_turn_then_close(service: GeminiLiveService) -> None:
    service.plan(FaultPlan.go_away(after_turns=1, time_left_s=0.2))
    async with raw_client(service, SETUP) as client:
        await client.say("Hello")
        await client.until("goAway")
        went_away = time.monotonic()
        await client.closed()
    assert time.monotonic() - went_away >= 0.19
    assert client.kinds()[-3:] == ["turnComplete", "sessionResumptionUpdate", "goAway"]
    assert client.frames[-1][1] == {"goAway": {"timeLeft": "0.2s"}}
    assert client.ws.close_code == 1000
    assert service.connections[0].close_code == 1000


async def test_go_away_mid_reply_after_k_chunks(service: GeminiLiveService) -> None:
    service.plan(FaultPlan.go_away(chunks=5, time_left_s=5))
    async with raw_client(service, SETUP) as client:
        await client.say("Hello there, how are you?")
        await client.until("turnComplete")
    kinds = [k for k in client.kinds() if k != "outputTranscription"]
    assert kinds.index("goAway") == kinds.index("modelTurn") + 5
    assert client.count("generationComplete") == 1  # the reply goes on until the close


@pytest.mark.parametrize(
    "plan",
    [FaultPlan.drop(after_s=0.05), FaultPlan.drop(chunks=3)],
    ids=["idle", "mid-reply"],
)
async def test_drop_leaves_no_close_frame(service: GeminiLiveService, plan: FaultPlan) -> None:
    service.plan(plan)
    async with raw_client(service, SETUP) as client:
        await client.say("Hello there, how are you?")
        await client.closed()
    assert client.ws.protocol.close_rcvd is None
    assert client.ws.close_code == 1006
    assert client.count("modelTurn") == (3 if plan.chunks else client.count("modelTurn"))
    if plan.chunks:
        assert client.count("turnComplete") == 0
    await service.wait_for(lambda: service.connections[0].closed_at is not None)
    assert service.connections[0].close_code == 1006


@pytest.mark.parametrize(
    "plan", [FaultPlan.close(after_turns=1), FaultPlan.close(chunks=2)], ids=["idle", "mid-reply"]
)
async def test_close_1011(service: GeminiLiveService, plan: FaultPlan) -> None:
    service.plan(plan)
    async with raw_client(service, SETUP) as client:
        await client.say("Hello")
        await client.closed()
    assert client.ws.close_code == 1011
    assert client.ws.close_reason == "Internal error encountered."
    assert client.count("modelTurn") >= 2


async def test_stall_transcribes_but_never_answers(service: GeminiLiveService) -> None:
    service.plan(FaultPlan.stall())
    async with raw_client(service, SETUP) as client:
        await client.speak(SPEECH)
        await client.say("Hello?")
        await client.until("inputTranscription")
        await asyncio.sleep(0.3)
    assert client.count("modelTurn") == client.count("turnComplete") == 0
    assert service.connections[0].text_turns == ["Hello?"]


async def test_accept_then_drop_every_connection(service: GeminiLiveService) -> None:
    service.always(FaultPlan.drop())
    for _ in range(2):
        async with raw_client(service, SETUP) as client:
            await client.closed()
        assert client.kinds() == ["setupComplete", "sessionResumptionUpdate"]
        assert client.ws.close_code == 1006
    assert len(service.connections) == 2


@pytest.mark.parametrize(("model", "turn_completes"), [(MODEL_25, 2), (MODEL_3, 1)])
async def test_tool_call_then_reply_after_the_response(
    service: GeminiLiveService, model: str, turn_completes: int
) -> None:
    service.plan(FaultPlan.tool_call("lookup", {"city": "Paris"}))
    async with raw_client(service, {**SETUP, "model": f"models/{model}"}) as client:
        await client.say("Weather in Paris?")
        await client.until("toolCall")
        await asyncio.sleep(0.1)
        assert client.count("modelTurn") == 0
        assert client.count("turnComplete") == turn_completes - 1
        call = client.frames[-1 if turn_completes == 1 else -2][1]["toolCall"]["functionCalls"][0]
        assert call["name"] == "lookup" and call["args"] == {"city": "Paris"}
        response = {"id": call["id"], "name": "lookup", "response": {"sky": "clear"}}
        await client.send(tool_response={"functionResponses": [response]})
        await client.until("turnComplete", turn_completes)
    assert client.count("modelTurn") > 0
    assert service.connections[0].tool_responses == [response]
    assert client.count("sessionResumptionUpdate") == 3  # idle, busy, idle: none while the tool ran


async def test_slow_setup(service: GeminiLiveService) -> None:
    service.plan(FaultPlan.slow_setup(0.3))
    started = time.monotonic()
    async with raw_client(service, SETUP):
        assert time.monotonic() - started >= 0.3


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "named"),
    [
        pytest.param({**SETUP, "voice": "Puck"}, '"voice"', id="unknown"),
        pytest.param(
            {**SETUP, "responseModalities": ["AUDIO"]}, '"responseModalities"', id="misplaced"
        ),
        pytest.param(
            {**SETUP, "generationConfig": {"speechConfig": {"voice": "Puck"}}},
            "setup.generation_config.speech_config",
            id="nested",
        ),
        pytest.param(
            {**SETUP, "model": f"models/{MODEL_3}", "proactivity": {"proactiveAudio": False}},
            "proactivity",
            id="3.x-proactivity",
        ),
        pytest.param({**SETUP, "model": MODEL_25}, "models/<name>", id="bare-model"),
    ],
)
async def test_bad_setup_is_closed_with_1007_naming_the_field(
    service: GeminiLiveService, setup: dict[str, Any], named: str
) -> None:
    async with raw_client(service) as client:
        await client.send(setup=setup)
        await client.closed()
    assert client.ws.close_code == 1007
    assert named in client.ws.close_reason
    assert client.frames == []


async def test_3x_drops_affective_dialog_and_25_keeps_proactivity(
    service: GeminiLiveService,
) -> None:
    config = {"responseModalities": ["AUDIO"], "enableAffectiveDialog": True}
    async with raw_client(
        service, {**SETUP, "model": f"models/{MODEL_3}", "generationConfig": config}
    ):
        pass
    async with raw_client(service, {**SETUP, "proactivity": {"proactive_audio": True}}):
        pass
    assert service.connections[0].ignored_fields == ["generationConfig.enableAffectiveDialog"]
    assert service.connections[1].ignored_fields == []


async def test_first_frame_must_be_setup_and_a_key_is_required(
    service: GeminiLiveService,
) -> None:
    async with raw_client(service) as client:
        await client.send(realtime_input={"audioStreamEnd": True})
        await client.closed()
    assert client.ws.close_code == 1007
    assert "first message" in client.ws.close_reason
    async with raw_client(service, headers={}) as client:
        await client.send(setup=SETUP)
        await client.closed()
    assert client.ws.close_code == 1008
    with pytest.raises(InvalidStatus):
        async with connect(
            service.url().replace("BidiGenerateContent", "Nothing"), ssl=service.ssl_context()
        ):
            pass


async def test_v1beta_is_served_too(service: GeminiLiveService) -> None:
    async with raw_client(service, SETUP, version="v1beta") as client:
        await client.say("Hello")
        await client.until("turnComplete")
    assert ".v1beta." in service.connections[0].path


# --- real clients -----------------------------------------------------------------------------


async def test_google_genai_client_round_trip(service: GeminiLiveService) -> None:
    client = genai.Client(
        api_key="standin-key",
        vertexai=False,
        http_options=types.HttpOptions(
            base_url=service.base_url,
            api_version="v1alpha",
            async_client_args={"ssl": service.ssl_context()},
        ),
    )
    config = types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO],
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
        session_resumption=types.SessionResumptionConfig(),
    )
    audio, transcript, handles = bytearray(), "", []
    async with client.aio.live.connect(model=MODEL_3, config=config) as session:
        for i in range(0, len(SPEECH), 3200):
            blob = types.Blob(data=SPEECH[i : i + 3200], mime_type="audio/pcm;rate=16000")
            await session.send_realtime_input(audio=blob)
        async for message in session.receive():
            if message.data:
                audio += message.data
            content = message.server_content
            if content and content.output_transcription:
                transcript += content.output_transcription.text or ""
            if message.session_resumption_update:
                handles.append(message.session_resumption_update.new_handle)
    assert len(audio) == pytest.approx(48000, abs=1920)
    assert transcript == "(echo of 1.0 s of caller speech)"
    assert handles[-1] is None  # the non-resumable update while generating
    record = service.connections[0]
    assert record.model == f"models/{MODEL_3}"
    assert record.input_forms == {"audio"}


def _phone_run_config() -> RunConfig:
    return RunConfig(
        streaming_mode=StreamingMode.BIDI,
        response_modalities=[types.Modality.AUDIO],
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
        session_resumption=types.SessionResumptionConfig(),
        context_window_compression=types.ContextWindowCompressionConfig(
            sliding_window=types.SlidingWindow()
        ),
    )


def _audio(events: list[Any]) -> bytes:
    return b"".join(
        p.inline_data.data
        for e in events
        if e.content and e.content.parts
        for p in e.content.parts
        if p.inline_data and p.inline_data.data
    )


def _answered(events: list[Any]) -> bool:
    """A turn with audio has completed (the turn of a tool call has none)."""
    heard = False
    for event in events:
        heard = heard or bool(_audio([event]))
        if heard and event.turn_complete:
            return True
    return False


async def _run_live(agent: LlmAgent, done: Callable[[list[Any]], bool] = _answered) -> list[Any]:
    """Speaks one utterance into an ADK live session and ends the call once `done`."""
    runner = Runner(
        app=App(name="phone", root_agent=agent),
        session_service=InMemorySessionService(),
        auto_create_session=True,
    )
    queue, events = LiveRequestQueue(), []
    for i in range(0, len(SPEECH), 640):
        queue.send_realtime(types.Blob(data=SPEECH[i : i + 640], mime_type="audio/pcm;rate=16000"))

    async def hang_up() -> None:
        await _poll(lambda: done(events), timeout=10)
        queue.close()

    hanging_up = asyncio.create_task(hang_up())
    async with asyncio.timeout(10):
        async for event in runner.run_live(
            user_id="caller",
            session_id="call",
            live_request_queue=queue,
            run_config=_phone_run_config(),
        ):
            events.append(event)
    await hanging_up
    return events


async def test_adk_default_agent_reaches_the_service_through_the_environment(
    service: GeminiLiveService, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in service.environ().items():
        monkeypatch.setenv(name, value)
    agent = LlmAgent(name="phone", model=MODEL_25, instruction="Be brief.")
    events = await _run_live(agent)
    assert len(_audio(events)) == pytest.approx(48000, abs=1920)
    assert any(e.turn_complete for e in events)
    assert any(e.input_transcription and e.input_transcription.finished for e in events)
    record = service.connections[0]
    assert record.setup is not None
    assert record.setup["contextWindowCompression"] == {"sliding_window": {}}
    assert record.input_forms == {"mediaChunks"}


async def test_adk_runs_the_tool_the_service_calls(
    service: GeminiLiveService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GOOGLE_GEMINI_BASE_URL", raising=False)
    for name, value in service.environ().items():
        if name != "GOOGLE_GEMINI_BASE_URL":
            monkeypatch.setenv(name, value)

    def lookup(city: str) -> dict[str, str]:
        """Looks up the weather in a city."""
        return {"city": city, "sky": "clear"}

    service.plan(FaultPlan.tool_call("lookup", {"city": "Paris"}))
    model = Gemini(model=MODEL_25, base_url=service.base_url)
    agent = LlmAgent(name="phone", model=model, instruction="Be brief.", tools=[lookup])
    events = await _run_live(agent)
    assert service.connections[0].tool_responses[0]["response"] == {
        "city": "Paris",
        "sky": "clear",
    }
    assert any(e.get_function_calls() for e in events)
    assert len(_audio(events)) == pytest.approx(48000, abs=1920)


def test_running_in_a_thread_serves_clients_on_another_loop() -> None:
    async def talk(service: GeminiLiveService) -> None:
        async with raw_client(service, SETUP) as client:
            await client.say("Hello")
            await client.until("turnComplete")
        await service.wait_for(lambda: service.connections[0].closed_at is not None)

    with running_in_thread() as service:
        asyncio.run(talk(service))
        assert service.connections[0].text_turns == ["Hello"]


async def test_adk_resumes_with_its_handle_after_go_away(
    service: GeminiLiveService, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in service.environ().items():
        monkeypatch.setenv(name, value)
    service.plan(FaultPlan.go_away(after_turns=1))
    agent = LlmAgent(name="phone", model=MODEL_25, instruction="Be brief.")
    await _run_live(agent, lambda _: len(service.connections) == 2 and service.connections[1].sent)
    first, second = service.connections
    assert second.resumed_handle is not None
    assert second.context == first.context
    assert [t.role for t in second.context] == ["user", "model"]
