"""The turn state on its own: values in, actions out, no tasks or sockets."""

from __future__ import annotations

from telephony.call import Outcome
from telephony.call.turns import (
    AGENT_AUDIO,
    CLOSING,
    HANG_UP,
    HANG_UP_MAX_S,
    IDLE_PROMPT,
    MODEL_INTERRUPTED,
    MODEL_TURN_COMPLETE,
    PLAY,
    RESUME,
    SESSION_RESTARTED,
    WRAP_UP_PROMPT,
    CallerSpeechEnded,
    CallerSpeechStarted,
    CallerVoice,
    Goodbye,
    HangUpRequested,
    Hold,
    Interrupt,
    ModelOutput,
    Prompt,
    RestartModel,
    Tick,
    TurnState,
)

OVER_THE_AGENT = CallerSpeechStarted(1.0, agent_audible=True)


def _talking(turns: TurnState) -> TurnState:
    turns.handle(AGENT_AUDIO)
    return turns


def test_speech_over_the_agent_holds_its_audio_at_once() -> None:
    turns = _talking(TurnState(stall_s=15))
    assert turns.handle(OVER_THE_AGENT) == (Hold("caller speech"),)
    assert turns.handle(AGENT_AUDIO) == (PLAY,)  # queued behind the hold, not lost


def test_a_short_sound_resumes_the_held_audio_once_the_caller_is_quiet() -> None:
    turns = _talking(TurnState(stall_s=15, min_speech_ms=500, resume_after_ms=300))
    turns.handle(OVER_THE_AGENT)
    assert turns.handle(CallerVoice(speech_ms=400, silence_ms=0)) == ()
    assert turns.handle(CallerVoice(speech_ms=400, silence_ms=280)) == ()
    assert turns.handle(CallerVoice(speech_ms=400, silence_ms=300)) == (RESUME,)
    assert turns.handle(CallerSpeechEnded(2.0)) == ()  # already resumed
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_enough_speech_interrupts_and_the_rest_of_the_turn_is_dropped() -> None:
    turns = _talking(TurnState(stall_s=15, min_speech_ms=500))
    turns.handle(OVER_THE_AGENT)
    assert turns.handle(CallerVoice(speech_ms=480, silence_ms=0)) == ()
    assert turns.handle(CallerVoice(speech_ms=500, silence_ms=0)) == (Interrupt("caller speech"),)
    assert turns.handle(AGENT_AUDIO) == ()
    assert turns.handle(CallerVoice(speech_ms=900, silence_ms=0)) == ()  # decided once
    assert turns.handle(MODEL_TURN_COMPLETE) == ()
    assert turns.handle(AGENT_AUDIO) == (PLAY,)  # the next turn is heard


def test_a_caller_who_pauses_then_goes_on_still_interrupts() -> None:
    turns = _talking(TurnState(stall_s=15, resume_after_ms=300))
    turns.handle(OVER_THE_AGENT)
    assert turns.handle(CallerVoice(speech_ms=200, silence_ms=300)) == (RESUME,)
    assert turns.handle(CallerVoice(speech_ms=600, silence_ms=0)) == (Interrupt("caller speech"),)


def test_the_end_of_a_short_utterance_resumes_if_nothing_did() -> None:
    turns = _talking(TurnState(stall_s=15))
    turns.handle(OVER_THE_AGENT)
    assert turns.handle(CallerSpeechEnded(1.5)) == (RESUME,)


def test_speech_while_the_agent_is_silent_holds_nothing() -> None:
    turns = TurnState(stall_s=15)
    assert turns.handle(CallerSpeechStarted(1.0, agent_audible=False)) == ()
    assert turns.handle(CallerVoice(speech_ms=2000, silence_ms=0)) == ()
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_the_model_reporting_an_interruption_clears_and_ends_its_turn() -> None:
    turns = _talking(TurnState(stall_s=15))
    assert turns.handle(MODEL_INTERRUPTED) == (Interrupt("model interrupted"),)
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_during_a_hold_the_models_interruption_leaves_the_decision_to_the_caller() -> None:
    """Its VAD counts an "mm-hm" as a turn; what it generated before is still worth hearing."""
    turns = _talking(TurnState(stall_s=15, resume_after_ms=300))
    turns.handle(OVER_THE_AGENT)
    assert turns.handle(MODEL_INTERRUPTED) == ()
    assert turns.handle(CallerVoice(speech_ms=400, silence_ms=300)) == (RESUME,)


def test_last_words_are_cut_by_nothing() -> None:
    turns = _talking(TurnState(stall_s=15))
    turns.handle(CLOSING)
    assert turns.handle(AGENT_AUDIO) == ()
    assert turns.handle(OVER_THE_AGENT) == ()
    assert turns.handle(CallerVoice(speech_ms=2000, silence_ms=0)) == ()
    assert turns.handle(MODEL_INTERRUPTED) == ()


def test_a_restart_forgets_the_interrupted_turn() -> None:
    turns = _talking(TurnState(stall_s=15))
    turns.handle(OVER_THE_AGENT)
    turns.handle(CallerVoice(speech_ms=600, silence_ms=0))
    turns.handle(SESSION_RESTARTED)
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_a_model_silent_after_the_caller_spoke_is_restarted_and_watched_again() -> None:
    turns = TurnState(stall_s=15)
    turns.handle(CallerSpeechEnded(10.0))
    assert turns.handle(Tick(24.9)) == ()
    assert turns.handle(Tick(25.0)) == (RestartModel(15.0),)
    turns.handle(SESSION_RESTARTED)
    assert turns.handle(Tick(39.9)) == ()
    assert turns.handle(Tick(40.0)) == (RestartModel(15.0),)  # the new session stalled too


def test_the_wait_for_an_answer_starts_when_the_caller_last_stops_talking() -> None:
    turns = TurnState(stall_s=15)
    turns.handle(CallerSpeechEnded(3.0))
    turns.handle(CallerSpeechStarted(3.7, agent_audible=False))  # they go on talking
    assert turns.handle(Tick(18.0)) == ()
    turns.handle(CallerSpeechEnded(20.0))
    assert turns.handle(Tick(34.9)) == ()
    assert turns.handle(Tick(35.0)) == (RestartModel(15.0),)


def test_a_backchannel_over_the_agent_asks_for_no_answer() -> None:
    turns = _talking(TurnState(stall_s=15))
    turns.handle(OVER_THE_AGENT)
    turns.handle(CallerVoice(speech_ms=400, silence_ms=0))
    turns.handle(CallerSpeechEnded(2.0))
    assert turns.awaiting_reply_since is None
    assert turns.handle(Tick(60.0)) == ()
    turns.handle(CallerSpeechStarted(61.0, agent_audible=True))  # a real interruption
    turns.handle(CallerVoice(speech_ms=600, silence_ms=0))
    turns.handle(CallerSpeechEnded(63.0))
    assert turns.awaiting_reply_since == 63.0


def test_only_model_output_answers_the_stall_watch() -> None:
    turns = TurnState(stall_s=15)
    turns.handle(CallerSpeechEnded(10.0))
    turns.handle(ModelOutput(11.0))
    assert turns.handle(Tick(30.0)) == ()


def test_after_a_restart_cut_a_reply_off_the_new_answer_replaces_its_rest() -> None:
    turns = _talking(TurnState(stall_s=15))
    turns.handle(SESSION_RESTARTED)
    assert turns.handle(ModelOutput(5.0)) == (
        Interrupt("a reconnect cut the reply off", by_caller=False),
    )
    assert turns.handle(ModelOutput(5.1)) == ()
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_end_call_hangs_up_once_the_goodbye_after_it_has_been_heard() -> None:
    turns = TurnState(stall_s=15.0)
    turns.handle(HangUpRequested(10.0))  # the tool runs; the goodbye follows its result
    assert turns.handle(Tick(10.5)) == ()
    turns.handle(ModelOutput(10.6))
    turns.handle(AGENT_AUDIO)
    assert turns.handle(Tick(11.0, playing=True)) == ()
    turns.handle(MODEL_TURN_COMPLETE)
    assert turns.handle(Tick(11.5, playing=True)) == ()  # still playing at the caller's end
    assert turns.handle(Tick(12.5, playing=False)) == (HANG_UP,)


def test_end_call_after_the_goodbye_hangs_up_when_the_model_has_no_more_to_say() -> None:
    turns = TurnState(stall_s=15.0)
    turns.handle(ModelOutput(9.0))
    turns.handle(HangUpRequested(10.0))
    assert turns.handle(Tick(11.9)) == ()
    assert turns.handle(Tick(12.0)) == (HANG_UP,)


def test_end_call_ends_the_call_within_a_bound_whatever_happens() -> None:
    turns = TurnState(stall_s=100.0)
    turns.handle(HangUpRequested(0.0))
    turns.handle(AGENT_AUDIO)  # a model that never stops talking
    assert turns.handle(Tick(HANG_UP_MAX_S - 0.1, playing=True)) == ()
    assert turns.handle(Tick(HANG_UP_MAX_S, playing=True)) == (HANG_UP,)


def test_a_silent_caller_is_asked_once_then_hears_the_goodbye() -> None:
    turns = TurnState(stall_s=15.0, caller_idle_s=30.0)
    turns.handle(AGENT_AUDIO)
    turns.handle(MODEL_TURN_COMPLETE)
    assert turns.handle(Tick(10.0, playing=True)) == ()  # the caller still hears the agent
    assert turns.handle(Tick(12.0)) == ()  # heard it all: the silence starts
    assert turns.handle(Tick(41.9)) == ()
    assert turns.handle(Tick(42.0)) == (Prompt(IDLE_PROMPT),)
    turns.handle(AGENT_AUDIO)  # "Are you still there?"
    turns.handle(MODEL_TURN_COMPLETE)
    assert turns.handle(Tick(44.0)) == ()
    assert turns.handle(Tick(74.0)) == (Goodbye("the caller stayed silent", Outcome.CALLER_IDLE),)


def test_a_caller_who_speaks_again_is_not_idle() -> None:
    turns = TurnState(stall_s=15.0, caller_idle_s=30.0)
    turns.handle(Tick(0.0))
    assert turns.handle(Tick(30.0)) == (Prompt(IDLE_PROMPT),)
    turns.handle(CallerSpeechStarted(31.0, agent_audible=False))
    assert turns.handle(Tick(70.0)) == ()  # still talking
    turns.handle(CallerSpeechEnded(71.0))
    turns.handle(ModelOutput(71.5))
    turns.handle(MODEL_TURN_COMPLETE)
    turns.handle(Tick(72.0))
    assert turns.handle(Tick(102.0)) == (Prompt(IDLE_PROMPT),)  # asked afresh, not hung up


def test_the_time_limit_asks_the_model_to_wrap_up_then_ends_with_the_goodbye() -> None:
    """A minute before the limit, at a moment nobody speaks; the goodbye at the limit."""
    turns = TurnState(stall_s=15.0, started_at=100.0, max_call_s=600.0)
    assert turns.handle(Tick(639.0)) == ()
    assert turns.handle(Tick(640.0, playing=True)) == ()  # it would cut the agent off
    assert turns.handle(Tick(641.0)) == (Prompt(WRAP_UP_PROMPT),)
    assert turns.handle(Tick(650.0)) == ()
    assert turns.handle(Tick(700.0, playing=True)) == (
        Goodbye("the call reached its time limit", Outcome.TIME_LIMIT),
    )
    turns.handle(CLOSING)
    assert turns.handle(Tick(701.0)) == ()  # the goodbye is playing: nothing more


def test_end_call_on_a_2_5_model_waits_for_the_goodbye_after_the_tool_result() -> None:
    """ADK runs a 2.5 model's tool just before that turn's turn_complete: that turn end says
    nothing about the goodbye, which comes in the next turn."""
    turns = TurnState(stall_s=15.0)
    turns.handle(ModelOutput(9.9))  # the tool call
    turns.handle(HangUpRequested(10.0))
    turns.handle(MODEL_TURN_COMPLETE)
    assert turns.handle(Tick(10.3)) == ()  # the goodbye has not even started
    turns.handle(ModelOutput(10.5))
    turns.handle(AGENT_AUDIO)
    turns.handle(MODEL_TURN_COMPLETE)
    assert turns.handle(Tick(11.0, playing=True)) == ()
    assert turns.handle(Tick(12.5)) == (HANG_UP,)
