"""The turn state on its own: values in, actions out, no tasks or sockets."""

from __future__ import annotations

from telephony.call.turns import (
    AGENT_AUDIO,
    CLOSING,
    MODEL_INTERRUPTED,
    MODEL_TURN_COMPLETE,
    PLAY,
    SESSION_RESTARTED,
    CallerSpeechEnded,
    CallerSpeechStarted,
    Interrupt,
    ModelEvent,
    RestartModel,
    Tick,
    TurnState,
)


def test_agent_audio_plays_until_the_caller_talks_over_it_then_the_rest_of_the_turn_is_dropped():
    turns = TurnState(stall_s=15)
    assert turns.handle(AGENT_AUDIO) == (PLAY,)
    assert turns.handle(CallerSpeechStarted(1.0, agent_audible=True)) == (
        Interrupt("caller speech"),
    )
    assert turns.handle(AGENT_AUDIO) == ()
    assert turns.handle(MODEL_TURN_COMPLETE) == ()
    assert turns.handle(AGENT_AUDIO) == (PLAY,)  # the next turn is heard


def test_speech_while_the_agent_is_silent_interrupts_nothing():
    turns = TurnState(stall_s=15)
    assert turns.handle(CallerSpeechStarted(1.0, agent_audible=False)) == ()
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_a_finished_turn_still_playing_is_cleared_but_the_next_turn_is_not_discarded():
    turns = TurnState(stall_s=15)
    turns.handle(AGENT_AUDIO)
    turns.handle(MODEL_TURN_COMPLETE)
    assert turns.handle(CallerSpeechStarted(2.0, agent_audible=True)) == (
        Interrupt("caller speech"),
    )
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_the_model_reporting_an_interruption_clears_and_ends_its_turn():
    turns = TurnState(stall_s=15)
    turns.handle(AGENT_AUDIO)
    assert turns.handle(MODEL_INTERRUPTED) == (Interrupt("model interrupted"),)
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_last_words_take_the_floor_for_good():
    turns = TurnState(stall_s=15)
    turns.handle(CLOSING)
    assert turns.handle(AGENT_AUDIO) == ()
    assert turns.handle(CallerSpeechStarted(1.0, agent_audible=True)) == ()


def test_a_restart_forgets_the_interrupted_turn():
    turns = TurnState(stall_s=15)
    turns.handle(AGENT_AUDIO)
    turns.handle(CallerSpeechStarted(1.0, agent_audible=True))
    turns.handle(SESSION_RESTARTED)
    assert turns.handle(AGENT_AUDIO) == (PLAY,)


def test_a_model_silent_after_the_caller_spoke_is_restarted_once():
    turns = TurnState(stall_s=15)
    turns.handle(CallerSpeechEnded(10.0))
    turns.handle(CallerSpeechEnded(12.0))  # the wait started at the first end of speech
    assert turns.handle(Tick(24.9)) == ()
    assert turns.handle(Tick(25.0)) == (RestartModel(15.0),)
    assert turns.handle(Tick(40.0)) == ()


def test_any_model_event_answers_the_stall_watch():
    turns = TurnState(stall_s=15)
    turns.handle(CallerSpeechEnded(10.0))
    turns.handle(ModelEvent(11.0))
    assert turns.handle(Tick(30.0)) == ()
