"""The least a Twilio <-> Gemini Live relay can do, as the baseline `bench/realpath.py` measures
the product against: a `websockets` server speaking Twilio Media Streams, one google-genai
`client.aio.live.connect` per stream, the project's converters, and nothing else (no ADK, no
pacing, no marks, no VAD, no echo suppression, no barge-in beyond passing the model's
`interrupted` on as a clear). Each 20 ms caller frame goes upstream as it comes, as the
simplest relay sends it.

The live setup asks for what the product's asks for (transcripts both ways, resumption,
context compression) so the service does the same work for both, and the call opens with the
product's greeting turn.

Run: python bench/bare_relay.py PORT  (google-genai reads the service's address and key from
the environment, as the product does)
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

from google import genai
from google.genai import types
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telephony.agents.gemini import PHONE_INSTRUCTION  # noqa: E402
from telephony.agents.models import default_model  # noqa: E402
from telephony.audio import InboundConverter, OutboundConverter  # noqa: E402
from telephony.settings import DEFAULT_GREETING  # noqa: E402
from telephony.twilio.media_stream import clear_message, media_message  # noqa: E402

CONFIG = types.LiveConnectConfig(
    response_modalities=[types.Modality.AUDIO],
    system_instruction=PHONE_INSTRUCTION,
    input_audio_transcription=types.AudioTranscriptionConfig(),
    output_audio_transcription=types.AudioTranscriptionConfig(),
    session_resumption=types.SessionResumptionConfig(),
    context_window_compression=types.ContextWindowCompressionConfig(
        sliding_window=types.SlidingWindow()
    ),
)


async def relay(ws: ServerConnection, client: genai.Client) -> None:
    stream_sid = ""
    async for raw in ws:
        message = json.loads(raw)
        if message["event"] == "start":
            stream_sid = message["start"]["streamSid"]
            break
    async with client.aio.live.connect(model=default_model(), config=CONFIG) as session:
        await session.send_realtime_input(text=DEFAULT_GREETING)
        downstream = asyncio.create_task(model_to_caller(session, ws, stream_sid))
        inbound = InboundConverter()
        try:
            async for raw in ws:
                message = json.loads(raw)
                event = message["event"]
                if event == "media":
                    pcm = inbound.convert(base64.b64decode(message["media"]["payload"]))
                    await session.send_realtime_input(
                        audio=types.Blob(data=pcm, mime_type="audio/pcm;rate=16000")
                    )
                elif event == "stop":
                    break
        except ConnectionClosed:
            pass
        finally:
            downstream.cancel()


async def model_to_caller(session: object, ws: ServerConnection, stream_sid: str) -> None:
    outbound = OutboundConverter()
    while True:  # receive() ends at each turn_complete
        async for message in session.receive():  # type: ignore[attr-defined]
            content = message.server_content
            if content is None:
                continue
            if content.model_turn and content.model_turn.parts:
                for part in content.model_turn.parts:
                    if part.inline_data and part.inline_data.data:
                        mulaw = outbound.convert(part.inline_data.data)
                        if mulaw:
                            await ws.send(media_message(stream_sid, mulaw))
            if content.interrupted:
                outbound = OutboundConverter()
                await ws.send(clear_message(stream_sid))
            elif content.turn_complete and (rest := outbound.flush()):
                await ws.send(media_message(stream_sid, rest))


async def main(port: int) -> None:
    client = genai.Client()

    async def handler(ws: ServerConnection) -> None:
        try:
            await relay(ws, client)
        except ConnectionClosed:
            pass

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=None):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
