"""Records the call library in this folder: real speech (espeak-ng, several languages, noise
added to some) placed as real calls, in real time, against `telephony serve echo` on
loopback with recording on. Needs espeak-ng and sox; the tests only need the recordings.

Run from the repository root: python -m tests.calls.make_calls [NAME ...]
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from telephony.audio import mulaw_decode, mulaw_encode
from telephony.testing.simulator import CallerSimulator, place_call
from tests.audio_tools import line_noise
from tests.server import running_server

HERE = Path(__file__).parent


def speak(text: str, voice: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        raw = Path(tmp) / "s.ulaw"
        subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(wav), text], check=True)
        subprocess.run(
            ["sox", str(wav), "-r", "8000", "-c", "1", "-e", "mu-law", "-t", "raw", str(raw)],
            check=True,
        )
        return raw.read_bytes()


def with_noise(mulaw: bytes, rms: float, seed: int = 3) -> bytes:
    speech = np.frombuffer(mulaw_decode(mulaw), np.int16).astype(np.float64)
    noise = np.frombuffer(mulaw_decode(line_noise(len(speech) / 8000, "line", rms, seed)), np.int16)
    mixed = np.clip(speech + noise[: len(speech)], -32768, 32767).astype("<i2")
    return mulaw_encode(mixed.tobytes())


async def agent_starts(sim: CallerSimulator, after: float) -> float:
    """When agent audio arriving after `after` starts playing."""
    heard = await sim.agent_audio_after(after, timeout=15.0)
    if heard is None:
        raise TimeoutError("the agent never answered")
    return heard.start


async def say_and_wait(sim: CallerSimulator, audio: bytes) -> None:
    await sim.say(audio)
    await sim.finish_speaking()
    await agent_starts(sim, asyncio.get_running_loop().time())
    await sim.agent_quiet(1.5)


async def one_turn(sim: CallerSimulator) -> None:
    await asyncio.sleep(1.0)
    await say_and_wait(sim, speak("Hello, I would like to book a table for two.", "en-us"))
    await sim.hang_up()


async def several_turns(sim: CallerSimulator) -> None:
    await asyncio.sleep(1.0)
    await say_and_wait(sim, speak("Good morning, is the shop open today?", "en-gb"))
    await say_and_wait(sim, speak("Bonjour, je voudrais changer ma commande.", "fr-fr"))
    await say_and_wait(sim, speak("Danke schön, auf Wiederhören.", "de"))
    await sim.hang_up()


async def early_barge_in(sim: CallerSimulator) -> None:
    """Talks over the agent while the model is still generating its reply."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(1.0)
    await sim.say(speak("I need to speak to somebody about my electricity bill please.", "en-us"))
    await sim.finish_speaking()
    started = await agent_starts(sim, loop.time())
    await asyncio.sleep(max(0.0, started + 0.2 - loop.time()))
    await say_and_wait(sim, speak("No, stop, wait a moment.", "en-us"))
    await sim.hang_up()


async def late_barge_in(sim: CallerSimulator) -> None:
    """Talks over agent audio still playing long after the model finished generating."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(1.0)
    await sim.say(
        speak("Could you tell me the opening hours of the library on Saturday afternoon?", "en-us")
    )
    await sim.finish_speaking()
    started = await agent_starts(sim, loop.time())
    await asyncio.sleep(max(0.0, started + 2.5 - loop.time()))
    await say_and_wait(sim, speak("Sorry, I have to interrupt you.", "en-gb"))
    await sim.hang_up()


async def dtmf_mid_call(sim: CallerSimulator) -> None:
    await asyncio.sleep(1.0)
    await say_and_wait(sim, speak("My account number is", "en-us"))
    for digit in "4207#":
        await sim.press(digit)
        await asyncio.sleep(0.3)
    await asyncio.sleep(1.0)
    await say_and_wait(sim, speak("Did you get that?", "en-us"))
    await sim.hang_up()


async def noisy_no_speech(sim: CallerSimulator) -> None:
    """A noisy line from the first frame on, and nobody speaking."""
    await sim.say(line_noise(8.0, "line", rms=1500, seed=11))
    await sim.finish_speaking()
    await asyncio.sleep(1.0)
    await sim.hang_up()


async def noisy_speech(sim: CallerSimulator) -> None:
    audio = with_noise(speak("Hallo, ich möchte einen Termin vereinbaren.", "de"), rms=600)
    await sim.say(line_noise(1.5, "line", rms=600, seed=5) + audio)
    await sim.finish_speaking()
    await agent_starts(sim, asyncio.get_running_loop().time())
    await sim.agent_quiet(1.5)
    await sim.hang_up()


async def long_silence_then_speech(sim: CallerSimulator) -> None:
    await asyncio.sleep(6.0)
    await say_and_wait(sim, speak("Hola, ¿hay alguien ahí?", "es"))
    await sim.hang_up()


async def hang_up_mid_reply(sim: CallerSimulator) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(1.0)
    await sim.say(speak("I would like to know the status of my parcel to Amsterdam.", "en-us"))
    await sim.finish_speaking()
    started = await agent_starts(sim, loop.time())
    await asyncio.sleep(max(0.0, started + 1.0 - loop.time()))
    await sim.hang_up()


async def socket_drops(sim: CallerSimulator) -> None:
    """The WebSocket goes away without a `stop` (a network failure, not a hang-up)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(1.0)
    await sim.say(speak("Ciao, vorrei prenotare un tavolo per stasera.", "it"))
    await sim.finish_speaking()
    started = await agent_starts(sim, loop.time())
    await asyncio.sleep(max(0.0, started + 0.3 - loop.time()))  # the model is still generating
    await sim.close()


async def frames_stop(sim: CallerSimulator) -> None:
    """The caller's frames stop after speaking (no silence frames), as on some SIP trunks."""
    sim.continuous = False
    await asyncio.sleep(0.5)
    await say_and_wait(sim, speak("Olá, preciso de ajuda com a minha conta.", "pt"))
    await sim.hang_up()


SCENARIOS: dict[str, Callable[[CallerSimulator], Awaitable[None]]] = {
    f.__name__: f
    for f in (
        one_turn,
        several_turns,
        early_barge_in,
        late_barge_in,
        dtmf_mid_call,
        noisy_no_speech,
        noisy_speech,
        long_silence_then_speech,
        hang_up_mid_reply,
        socket_drops,
        frames_stop,
    )
}


def sid(name: str) -> str:
    return "CA" + hashlib.sha256(name.encode()).hexdigest()[:32]


async def record(base_url: str, name: str) -> None:
    async with place_call(base_url, call_sid=sid(name)) as sim:
        await SCENARIOS[name](sim)
    print(f"{name}: recorded", file=sys.stderr)


def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        record_dir = Path(tmp) / "recordings"
        with running_server(Path(tmp), record_dir=str(record_dir)) as server:
            for name in names or list(SCENARIOS):
                asyncio.run(record(server.base_url, name))
                path = record_dir / f"{sid(name)}.jsonl"
                for _ in range(100):  # the server finishes writing as the call winds down
                    if path.exists() and '"kind": "end"' in path.read_text():
                        break
                    asyncio.run(asyncio.sleep(0.1))
                (HERE / f"{name}.jsonl.gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))


if __name__ == "__main__":
    main(sys.argv[1:])
