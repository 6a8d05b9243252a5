"""Echo suppression on the caller's audio on its way to the model (16 kHz PCM16).

Handsets and speakerphones send the agent's own voice back up, 20-30 dB down. Our VAD can
ignore it, knowing what was played; the model's VAD cannot, takes it for the caller and cuts
its own reply. An adaptive echo canceller would have to track an echo path that includes the
phone network's changing delay; instead, like the non-linear processor that ends a G.168 echo
canceller, each 20 ms frame that the echo alone could account for is replaced, whole, by
comfort noise: noise shaped and scaled like the caller line's own background, learnt from its
quiet frames. Never by digital silence: a VAD adapts its noise floor to it, and then takes the
line's noise returning for speech.

What the echo could account for starts at the worst case, `ECHO_RETURN_LOSS` below the
agent's recent audio, and follows the echo this line really returns: many lines return none
(the handset cancels it), and there a soft onset of the caller's, quieter than the worst-case
echo, must not be cut.
Frames louder than the worst case are the caller talking over the agent and pass unchanged;
once the caller is talking (`TALK_FRAMES` loud frames of the last `TALK_WINDOW`), so does
everything until they pause for `HANGOVER_MS`, so the model hears their utterance whole, not
just its loud syllables. Each frame is decided as it arrives, on its own energy and what came
before: nothing is delayed.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .vad import NoiseFloor

__all__ = ["ECHO_RETURN_LOSS", "ComfortNoise", "EchoSuppressor"]

ECHO_RETURN_LOSS = 10 ** (-20 / 10)
"""The agent's own voice comes back in the caller's audio at least this much weaker (20 dB:
handsets and speakerphones return 20-30 dB less, line echo more still), as a ratio of mean
squares. Caller audio quieter than the agent's recent audio by more than that may be its echo;
a caller talking over the agent is about as loud as the agent."""
FRAME_SAMPLES = 320
"""20 ms at 16 kHz: the frame Twilio sends, and the unit of every decision."""
FRAME_MS = 20
TALK_FRAMES = 3
TALK_WINDOW = 5
"""Loud frames needed, among the last few, before the caller counts as talking: a lone frame
of echo above the margin, or a click, passes alone, without a hangover of echo after it."""
TALK_SNR = 10 ** (12 / 10)
"""A loud frame must also stand this far above the line's noise floor: on a noisy line with
the agent speaking softly, the noise itself is louder than any echo, and would otherwise
count as the caller talking (and let the echo of the agent's next loud words through)."""
HANGOVER_MS = 400
"""How long the caller counts as talking after their last loud frame: the gaps inside an
utterance (stops, "Wait, stop") and its soft onsets after them reach the model unchanged."""
ECHO_MARGIN = 10 ** (6 / 10)
"""Frames up to this much louder than the loudest echo this line has returned are echo too."""
ECHO_DECAY = 10 ** (-0.1 / 10)
"""Per frame of agent audio, what the echo could reach falls by 0.1 dB (5 dB/s) unless the
line shows echo that loud: after 4 s of the agent talking into a line that returns nothing,
it is 20 dB below the worst case, where a caller's soft onset is no longer taken for echo."""
EVIDENCE_FRAMES = 5
"""A quiet frame counts as the echo's level only once the caller has not started talking
within 100 ms of it: the first frames of a soft onset are no echo. Echo that comes back after
the estimate fell reaches the model for about that long (and the frame it takes to rise),
too short for a VAD to start a turn on."""
NOISE_FRAMES = 5
"""The line's level is judged over 100 ms: 20 ms of a rumble below 100 Hz swings by 10 dB
and more, and the quietest of such frames, taken for the floor, would be far below it."""
QUIET = 10 ** (3 / 10)
"""Frames within 3 dB of the line's noise floor are its background: they teach the noise."""
LEARN_RATE = 0.05
"""Weight of each quiet frame in the noise estimate (a time constant of 20 quiet frames)."""
SPECTRUM_EVERY = 5
"""The noise's spectrum is learnt from every fifth quiet frame: it changes slowly, and its
analysis is most of what a frame costs here."""
NOISE_BLOCK = 3200
"""Comfort noise is synthesized 200 ms at a time at unit level (its shape changes rarely)
and scaled to the line's level as it goes out: per 20 ms frame, the calls into numpy cost
more than their arithmetic."""
NOISE_TAPS = 160
"""Comfort noise is white noise through a filter this long, shaped like the line's noise in
100 Hz bands: its tilt and its bands, not the lines of a hum."""
_FFT_SIZE = 4096
"""Holds a block and the filter's tail: a block is filtered with one FFT product."""
FADE_SAMPLES = 64
"""Comfort noise that starts where the caller's audio stopped fades in over 4 ms, not to click."""
_FADE = np.linspace(0.0, 1.0, FADE_SAMPLES, endpoint=False)


class ComfortNoise:
    """The caller line's background: learnt from its quiet frames, synthesized on demand."""

    def __init__(self, *, seed: int = 0) -> None:
        """`seed`: comfort noise is random, but the same from call to call, so a replayed
        call sends the model what it sent the first time."""
        self._floor = NoiseFloor()
        self._energies: deque[float] = deque(maxlen=NOISE_FRAMES)
        self._power = np.zeros(NOISE_TAPS // 2 + 1)
        """The quiet frames' power spectrum (its shape counts, not its scale)."""
        self._energy = 0.0
        """The quiet frames' mean square."""
        self._quiet_frames = 0
        self._clean = False
        """Quiet frames without echo have been learnt."""
        self._shape: np.ndarray | None = None
        """The noise filter (unit gain) for the spectrum as it stands; None once it moved."""
        self._response = np.zeros(_FFT_SIZE // 2 + 1)
        """The filter's frequency response, to filter a block as one FFT product."""
        self._window = np.hanning(NOISE_TAPS)
        self._rng = np.random.default_rng(seed)
        self._excitation = np.zeros(NOISE_TAPS - 1)
        """The white noise behind `_unit`: the filter's history before each of its samples,
        so comfort noise flows across frames."""
        self._unit: np.ndarray | None = None
        """Comfort noise at unit level synthesized ahead (NOISE_BLOCK at a time), handed out
        from `_next`; None until the first is asked for."""
        self._next = 0
        self._peak = 0.0
        """The loudest sample of `_unit`: below full scale once scaled, no clipping needed."""
        self._restart = True

    @property
    def floor(self) -> float:
        """The line's noise floor (mean square, minimum statistics)."""
        return max(0.0, self._floor.level - 1.0)

    @property
    def level(self) -> float:
        """The line's noise (mean square) as comfort noise reproduces it. The estimate learns
        slowly; the floor follows a quieter line at once (its noise stopped: a mobile's own
        noise suppression, a mute), and noise louder than the line's would be noise starting
        after silence, the very thing to avoid."""
        return min(self._energy, self.floor * QUIET)

    def observe(self, frame: np.ndarray, energy: float, *, echo: bool = False) -> None:
        """Every frame of the line (float samples, and their mean square). `echo`: the frame
        may hold the agent's echo, which fills the pauses of the agent's speech near the
        floor: such frames teach the noise only until frames without it have (a greeting
        from the very first frame)."""
        self._energies.append(energy)
        energy = sum(self._energies) / len(self._energies)
        floor = self._floor.observe(energy + 1.0)  # + 1: digital silence has a floor too
        if energy + 1.0 > floor * QUIET or len(frame) != FRAME_SAMPLES:
            return
        if not echo and not self._clean:  # what echo taught goes
            self._clean, self._quiet_frames = True, 0
        elif echo and self._clean:
            return
        self._energy += (LEARN_RATE if self._quiet_frames else 1.0) * (energy - self._energy)
        if not self._quiet_frames % SPECTRUM_EVERY:
            blocks = frame.reshape(-1, NOISE_TAPS) * self._window
            power = np.mean(np.abs(np.fft.rfft(blocks, axis=1)) ** 2, axis=0)
            rate = LEARN_RATE * SPECTRUM_EVERY if self._quiet_frames else 1.0
            self._power += rate * (power - self._power)
            self._shape = None
        self._quiet_frames += 1

    def restart(self) -> None:
        """The next noise fades in from nothing rather than cutting in. Called for every frame
        that passes unchanged: it only takes note (the noise itself flows on)."""
        self._restart = True

    def generate(self, count: int) -> np.ndarray:
        """`count` samples of the line's noise, as float samples in int16 range."""
        if self._shape is None:
            shape = np.roll(np.fft.irfft(np.sqrt(self._power), NOISE_TAPS), NOISE_TAPS // 2)
            shape *= self._window
            gain = float(np.dot(shape, shape))
            self._shape = shape / np.sqrt(gain) if gain > 0 else shape
            self._response = np.fft.rfft(self._shape, _FFT_SIZE)
            if self._unit is not None:
                self._synthesize()
        if self._unit is None or self._next + count > len(self._unit):
            self._synthesize(count)
        assert self._unit is not None
        gain = np.sqrt(self.level)
        out = self._unit[self._next : self._next + count] * gain
        self._next += count
        if self._restart:
            fade = min(count, FADE_SAMPLES)
            out[:fade] *= _FADE[:fade]
            self._restart = False
        np.rint(out, out=out)
        return out if self._peak * gain < 32767 else np.clip(out, -32768, 32767)

    def _synthesize(self, at_least: int = 0) -> None:
        """The next NOISE_BLOCK (or `at_least`) of unit-level noise, from where the last one
        was handed out to, so the noise flows on across blocks (what of it was not handed out
        is made again: the shape moved, or less was left than asked for)."""
        if self._unit is not None:
            self._excitation = self._excitation[self._next : self._next + NOISE_TAPS - 1]
        fresh = self._rng.standard_normal(max(NOISE_BLOCK, at_least))
        excitation = np.concatenate([self._excitation, fresh])
        size = max(_FFT_SIZE, len(excitation))
        filtered = np.fft.irfft(np.fft.rfft(excitation, size) * self._filter(size), size)
        self._unit = filtered[NOISE_TAPS - 1 : len(excitation)]  # np.convolve's "valid" part
        self._peak = float(np.abs(self._unit).max())
        self._excitation = excitation
        self._next = 0

    def _filter(self, size: int) -> np.ndarray:
        if size == _FFT_SIZE:
            return self._response
        assert self._shape is not None
        return np.fft.rfft(self._shape, size)


class EchoSuppressor:
    """One caller's line: what its echo of the agent reaches, what it sounds like when nobody
    talks, and whether the caller is talking over the agent."""

    def __init__(self, *, seed: int = 0) -> None:
        """`seed`: of the comfort noise (see `ComfortNoise`)."""
        self._noise = ComfortNoise(seed=seed)
        self._recent: deque[bool] = deque(maxlen=TALK_WINDOW)
        self._since_loud = 0
        self._talking = False
        """The caller is talking over the agent: their audio passes unchanged."""
        self._echo_share = 1.0
        """What this line's echo has been seen to reach, as a share of the worst case."""
        self._evidence: deque[tuple[int, float]] = deque()
        """(frame number, echo share it shows) per quiet frame of the last `EVIDENCE_FRAMES`."""
        self._frames = 0

    def process(self, pcm16_16k: bytes, echo_energy: float) -> bytes:
        """The audio for the model: `pcm16_16k` with each frame the echo could account for
        replaced by comfort noise. `echo_energy` is the worst case (mean square): the loudest
        agent audio the caller may now hear or have echoed back, times `ECHO_RETURN_LOSS`; 0
        while the agent is silent, when nothing is replaced. Returns the input itself when
        nothing was."""
        samples = np.frombuffer(pcm16_16k[: len(pcm16_16k) // 2 * 2], "<i2")
        out: np.ndarray | None = None
        for start in range(0, len(samples), FRAME_SAMPLES):
            frame = samples[start : start + FRAME_SAMPLES].astype(np.float64)
            if self._keeps(frame, echo_energy):
                self._noise.restart()
                continue
            if out is None:
                out = samples.copy()
            out[start : start + len(frame)] = self._noise.generate(len(frame))
        return pcm16_16k if out is None else out.tobytes()

    def _keeps(self, frame: np.ndarray, worst: float) -> bool:
        energy = float(np.dot(frame, frame)) / len(frame)
        self._noise.observe(frame, energy, echo=worst > 0)
        self._frames += 1
        loud = worst > 0 and energy >= worst and energy >= self._noise.floor * TALK_SNR
        self._recent.append(loud)
        self._since_loud = 0 if loud else self._since_loud + 1
        if sum(self._recent) >= TALK_FRAMES:
            self._talking = True
        elif self._since_loud * FRAME_MS >= HANGOVER_MS:
            self._talking = False
        if worst <= 0:  # no echo to hear, nor to learn from
            self._evidence.clear()
            return True
        self._weigh(energy, worst)
        return energy >= worst * self._echo_share or self._talking

    def _weigh(self, energy: float, worst: float) -> None:
        """Learns how loud this line's echo is, from the frames below the worst case that the
        caller's talking did not follow."""
        self._echo_share *= ECHO_DECAY
        if self._talking:
            self._evidence.clear()  # the quiet frames just before were the caller's onset
        elif energy < worst:
            echo = max(0.0, energy - self._noise.level)
            self._evidence.append((self._frames, min(1.0, echo * ECHO_MARGIN / worst)))
        while self._evidence and self._evidence[0][0] <= self._frames - EVIDENCE_FRAMES:
            self._echo_share = max(self._echo_share, self._evidence.popleft()[1])
