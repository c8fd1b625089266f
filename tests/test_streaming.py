"""The streaming policy without a model: endpointing, LocalAgreement-2, trimming, guards.

Driven by the burst-speech doubles of tests/burst_speech.py, with a simulated clock that runs at
the speed of the audio (each frame arrives when it would in real time; decodes take no time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from numpy.typing import NDArray

from real_time_audio.audio.vad import SpeechEvent, VoiceActivityDetector
from real_time_audio.config import load_settings
from real_time_audio.service import TranscriptionRequest, TranscriptionResult, Word
from real_time_audio.streaming.agreement import LocalAgreement
from real_time_audio.streaming.policy import SegmentText, UtterancePolicy, Window
from tests.burst_speech import RATE, BurstTranscriber, EnergyScorer, burst, speech_block


@dataclass
class Run:
    outputs: list[SegmentText] = field(default_factory=list)
    windows: list[tuple[float, Window]] = field(default_factory=list)  # (arrival time, window)

    @property
    def finals(self) -> list[SegmentText]:
        return [o for o in self.outputs if o.is_final]

    def final_words(self) -> list[str]:
        return [w.text for o in self.finals for w in o.words]


def simulate(
    audio: NDArray[np.float32],
    policy: UtterancePolicy,
    model: BurstTranscriber,
    seed: int = 0,
    max_frame_s: float = 0.5,
) -> Run:
    """Stream `audio` in random frame sizes through VAD and policy, decoding every due window."""
    rng = np.random.default_rng(seed)
    vad = VoiceActivityDetector(EnergyScorer())
    run = Run()

    def drain(now: float, finalize_until: int | None = None) -> None:
        run.outputs.extend(policy.settle(now, finalize_until))
        while (window := policy.next_window(now, finalize_until)) is not None:
            run.windows.append((now, window))
            result = model.transcribe_batch([TranscriptionRequest(audio=window.audio, prefix=window.prefix or None)])[0]
            run.outputs.extend(policy.accept(window, result))
            run.outputs.extend(policy.settle(now, finalize_until))

    position = 0
    while position < len(audio):
        size = int(rng.integers(int(0.02 * RATE), int(max_frame_s * RATE)))
        chunk = audio[position : position + size]
        position += len(chunk)
        policy.feed(chunk, vad.process(chunk))
        drain(position / RATE)
    policy.feed(np.zeros(0, dtype=np.float32), vad.finish(policy.received))
    drain(position / RATE, finalize_until=policy.received)
    return run


def test_a_half_hour_stream_is_transcribed_exactly_at_constant_cost() -> None:
    """30 minutes, random frames and pauses: finals are the spoken words; cost stays flat; windows ≤ 30 s."""
    block, spoken = speech_block(seed=7, seconds=60.0, long_utterance_s=40.0)
    minutes = 30
    audio = np.tile(block, minutes)
    expected = [w.text for _ in range(minutes) for w in spoken]
    model = BurstTranscriber()
    policy = UtterancePolicy()
    run = simulate(audio, policy, model, seed=3)

    assert run.final_words() == expected
    assert any("~" in o.text for o in run.outputs if not o.is_final), "the model never misheard: nothing tested"
    # Partials only ever show words after the last final; finals come in order with growing ids.
    last_final_end = 0.0
    next_id = 0
    for output in run.outputs:
        assert output.segment_id == next_id
        assert all(w.start >= last_final_end for w in output.words)
        starts = [w.start for w in output.words]
        assert starts == sorted(starts)
        if output.is_final:
            last_final_end = output.words[-1].end
            next_id += 1
    assert max(model.window_seconds) <= 30.0
    assert policy.stats.longest_window <= 30 * RATE
    assert policy.stats.windows["cap"] == 0  # trimming kept every window under the limit
    calls_per_minute = np.bincount([int(at // 60) for at, _ in run.windows], minlength=minutes)
    first, last = calls_per_minute[:5].sum(), calls_per_minute[-6:-1].sum()
    assert abs(int(last) - int(first)) <= 0.05 * first, calls_per_minute
    assert sum(len(w.audio) for _, w in run.windows) / len(audio) < 10  # no growing re-decode


def test_silence_costs_no_decode() -> None:
    """Ten minutes of silence and of low noise: no window, no text, and only a pre-roll held."""
    rng = np.random.default_rng(0)
    audio = np.concatenate(
        [np.zeros(300 * RATE, dtype=np.float32), (rng.standard_normal(300 * RATE) * 0.003).astype(np.float32)]
    )
    model = BurstTranscriber()
    policy = UtterancePolicy()
    run = simulate(audio, policy, model)
    assert (model.calls, run.outputs) == (0, [])
    assert policy.pending <= policy.pad


def speech(*words: int, gap_s: float = 0.1) -> NDArray[np.float32]:
    pieces = [np.zeros(int(0.3 * RATE), dtype=np.float32)]
    for index in words:
        pieces += [burst(index, 0.3), np.zeros(int(gap_s * RATE), dtype=np.float32)]
    return np.concatenate(pieces)


Heard = tuple[str, float, float] | tuple[str, float, float, float]  # (text, start, end[, probability])


def result(*words: Heard, **kw: float | None) -> TranscriptionResult:
    timed = [Word(*word) for word in words]
    after_prefix = bool(kw.pop("after_prefix", False))
    options: dict[str, float | None] = {"avg_logprob": -0.2, "no_speech_prob": 0.01}
    options |= kw
    return TranscriptionResult(
        text=" ".join(w.text for w in timed),
        language="en",
        tokens=len(timed),
        words=timed,
        avg_logprob=float(options["avg_logprob"] or 0.0),
        no_speech_prob=options["no_speech_prob"],
        after_prefix=after_prefix,
    )


def started_policy(seconds: float = 3.0, **kw: object) -> UtterancePolicy:
    policy = UtterancePolicy(**kw)  # type: ignore[arg-type]
    policy.feed(np.full(int(seconds * RATE), 0.1, dtype=np.float32), [SpeechEvent("start", 0)])
    return policy


def test_agreeing_prefix_is_committed_and_the_tail_is_the_partial() -> None:
    """Two decodes agreeing on the phrase "a b," commit it as a final; "c d" stays the partial."""
    policy = started_policy()
    first = policy.next_window(now=1.0)
    assert first is not None and first.kind == "partial" and first.prefix == ""
    out = policy.accept(first, result(("a", 0.1, 0.4), ("b,", 0.5, 0.9), ("x", 1.0, 1.2)))
    assert [(o.is_final, o.text) for o in out] == [(False, "a b, x")]
    policy.feed(np.full(RATE, 0.1, dtype=np.float32))
    second = policy.next_window(now=2.0)
    assert second is not None
    out = policy.accept(second, result(("a", 0.1, 0.4), ("b,", 0.55, 0.9), ("c", 1.0, 1.3), ("d", 2.0, 2.2)))
    assert [(o.segment_id, o.is_final, o.text) for o in out] == [(0, True, "a b,"), (1, False, "c d")]
    assert out[0].words == (Word("a", 0.1, 0.4), Word("b,", 0.55, 0.9))
    # The committed words are forced at the start of the next decode, which returns only what follows.
    policy.feed(np.full(RATE, 0.1, dtype=np.float32))
    third = policy.next_window(now=3.0)
    assert third is not None and third.prefix == "a b,"
    out = policy.accept(third, result(("c", 0.85, 1.3), ("d.", 2.0, 2.3), ("e", 2.5, 2.8), after_prefix=True))
    assert [(o.segment_id, o.is_final, o.text) for o in out] == [(1, True, "c d."), (2, False, "e")]
    assert out[0].words[0] == Word("c", 0.9, 1.3)  # never before the last committed word


def test_a_decode_that_did_not_take_the_prefix_is_filtered_by_time() -> None:
    """A backend that could not force the committed words returns all of them again: they are not repeated."""
    policy = started_policy()
    for now in (1.0, 2.0):
        window = policy.next_window(now=now)
        assert window is not None
        policy.accept(window, result(("a", 0.1, 0.4), ("b,", 0.5, 0.9), ("c", 1.0, 1.3)))
        policy.feed(np.full(RATE, 0.1, dtype=np.float32))
    window = policy.next_window(now=3.0)
    assert window is not None and window.prefix == "a b,"
    out = policy.accept(window, result(("a", 0.1, 0.4), ("b,", 0.5, 0.9), ("c", 1.0, 1.3), ("d.", 1.4, 1.8)))
    assert [(o.is_final, o.text) for o in out] == [(False, "c d.")]  # "a b," is not sent again


def test_a_hypothesis_confirms_words_heard_alike_two_hypotheses_before_it() -> None:
    """The model hears "sick corpus.", then "set corpus.", then "sick corpus." again: the third
    decode confirms the words the first one heard alike. One further back confirms nothing."""
    agreement = LocalAgreement()

    def heard(second: str) -> list[Word]:
        return [Word("the", 0.0, 0.3), Word(second, 0.3, 0.6), Word("corpus.", 0.6, 1.0), Word("I", 1.2, 1.3)]

    assert agreement.insert(heard("sick"), heard_until=5.0) == []
    assert agreement.insert(heard("set"), heard_until=5.0) == []
    assert agreement.insert(heard("sick"), heard_until=5.0) == heard("sick")[:3]
    assert agreement.tail == [Word("I", 1.2, 1.3)]

    # "cold," is confirmed by neither of the two hypotheses before it, only by the one before those.
    def then(second: str) -> list[Word]:
        return [Word("I", 1.2, 1.3), Word("a", 1.4, 1.5), Word(second, 1.5, 2.0), Word("so", 2.1, 2.3)]

    for second in ("cold,", "code,", "goal,", "cold,"):
        assert agreement.insert(then(second), heard_until=5.0) == []
    assert agreement.insert(then("cold,"), heard_until=5.0) == then("cold,")[:3]
    # Words set from outside (held words) start a new history: the hypothesis before them is gone.
    agreement = LocalAgreement()
    for second in ("cold,", "goal,"):
        assert agreement.insert(then(second), heard_until=5.0) == []
    agreement.tail = then("goal,")
    assert agreement.insert(then("cold,"), heard_until=5.0) == []


def test_agreed_words_are_committed_only_once_audio_after_them_was_heard() -> None:
    """A word is settled only when 2.5 s of audio after it went into the decode that agreed on it."""
    agreement = LocalAgreement()
    words = [Word("one,", 0.0, 0.4), Word("two,", 1.0, 1.4)]
    agreement.insert(words, heard_until=3.0)
    assert agreement.insert(words, heard_until=3.2) == [words[0]]  # "two," ends 1.8 s before the audio does
    assert agreement.insert(words[1:], heard_until=3.9) == [words[1]]


def test_commit_delay_sets_how_much_audio_must_follow_an_agreed_word() -> None:
    """COMMIT_DELAY_S=5: what 2.5 s would settle waits until 5 s of audio follow it."""
    agreement = LocalAgreement(settle_age_s=5.0)
    words = [Word("one,", 0.0, 0.4), Word("two,", 1.0, 1.4)]
    agreement.insert(words, heard_until=3.0)
    assert agreement.insert(words, heard_until=4.0) == []
    assert agreement.insert(words, heard_until=5.6) == [words[0]]
    policy = UtterancePolicy.from_settings(load_settings(commit_delay_s=5.0))
    assert policy._agreement.settle_age_s == 5.0


def test_an_agreed_word_the_model_was_unsure_of_waits_twice_as_long() -> None:
    """Two early decodes agree on "Criccorpus." (a token of it at 8 %), with 3 s of audio after it:
    a sure word that far back is committed, this one waits for 5 s (the words after it with it).
    The decode that heard that much reads "sick corpus.", and that is what two decodes then agree on."""
    agreement = LocalAgreement()
    early = [Word("So,", 0.0, 0.3, 0.9), Word("Criccorpus.", 0.3, 1.0, 0.08), Word("Hopefully", 1.2, 1.6, 0.95)]
    assert agreement.insert(early, heard_until=3.6) == []
    assert agreement.insert(early, heard_until=4.0) == [early[0]]
    assert agreement.insert(early[1:], heard_until=5.8) == []
    later = [Word("sick", 0.3, 0.6, 0.3), Word("corpus.", 0.6, 1.0, 0.9), Word("Hopefully", 1.2, 1.6, 0.95)]
    assert agreement.insert(later, heard_until=6.0) == []
    assert agreement.insert(later, heard_until=6.4) == later[:2]
    # The same words with sure scores would have been final with the first decode that agreed.
    sure = LocalAgreement()
    sure.insert([Word(w.text, w.start, w.end) for w in early], heard_until=3.6)
    assert [w.text for w in sure.insert([Word(w.text, w.start, w.end) for w in early], heard_until=4.0)] == [
        "So,",
        "Criccorpus.",
    ]


def test_agreed_words_wait_for_the_end_of_their_phrase() -> None:
    """Agreed words without punctuation stay in the partial until a phrase ends, or six are waiting."""
    agreement = LocalAgreement()
    words = [Word(f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(8)]
    agreement.insert(words[:3])
    assert agreement.insert(words[:4]) == []  # "w0 w1 w2" agreed, no phrase end yet
    assert [w.text for w in agreement.tail] == ["w0", "w1", "w2", "w3"]
    assert agreement.insert([*words[:2], Word("w2,", 1.0, 1.4), *words[3:5]]) == [*words[:2], Word("w2,", 1.0, 1.4)]
    agreement = LocalAgreement()
    agreement.insert(words[:7])
    assert agreement.insert(words) == words[:7]  # six or more agreed: committed without a phrase end
    agreement = LocalAgreement()
    title = [Word("Mr.", 0.0, 0.3), Word("Quilter", 0.4, 0.9), Word("is", 1.0, 1.2)]
    agreement.insert(title)
    assert agreement.insert(title) == []  # an abbreviation's period ends no phrase


def test_words_that_moved_in_time_are_not_agreed() -> None:
    """The same word more than the tolerance later is a different word."""
    policy = started_policy()
    window = policy.next_window(now=1.0)
    assert window is not None
    policy.accept(window, result(("a", 0.1, 0.4)))
    policy.feed(np.full(RATE, 0.1, dtype=np.float32))
    window = policy.next_window(now=2.0)
    assert window is not None
    out = policy.accept(window, result(("a", 1.5, 1.8)))
    assert [o.is_final for o in out] == [False]


def test_speech_end_finalizes_everything_left() -> None:
    """FINAL_HOLD_MS=0: at the end of an utterance all unconfirmed words become one final at once;
    the padding is decoded too."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    assert (window.start, window.end) == (RATE // 2 - 3200, RATE + RATE // 2 + 3200)
    out = policy.accept(window, result(("hello", 0.3, 0.6), ("there", 0.7, 1.0)))
    assert [(o.is_final, o.text, o.start, o.end) for o in out] == [(True, "hello there", 0.6, 1.3)]
    assert policy.next_window(now=100.0) is None


def test_the_final_waits_for_the_tail_after_the_speech_end() -> None:
    """VAD_TAIL_MS beyond the silence the detector waited for: the final decode waits until the
    tail has arrived and covers it, so a last sound scored as silence is heard whole."""
    policy = UtterancePolicy(pad_s=0.2, tail_s=0.8, hold_s=0)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 4)])  # received: 2.0 s
    assert policy.next_window(now=0.0) is None  # the tail runs to 2.05 s
    assert policy.seconds_until_partial(now=0.0) is None
    policy.feed(np.zeros(int(0.05 * RATE), dtype=np.float32))
    window = policy.next_window(now=0.05)
    assert window is not None and window.kind == "final"
    assert (window.start, window.end) == (RATE // 2 - 3200, RATE + RATE // 4 + int(0.8 * RATE))
    assert policy.seconds_until_tail(now=0.05) is None


def test_after_a_silent_pause_the_final_waits_only_for_the_quiet_tail() -> None:
    """VAD_QUIET_TAIL_MS: a pause with no trace of voice in it ends the region that much after the
    speech end (here as soon as the detector ends the speech); a voiced one keeps the whole tail.
    Either way the words are held for FINAL_HOLD_MS counted from the speech end."""
    for voiced, end in ((False, 1.5 + 0.5), (True, 1.5 + 1.0)):
        policy = UtterancePolicy(pad_s=0.2, tail_s=1.0, quiet_tail_s=0.5, hold_s=1.2)
        policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
        policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2, voiced=voiced)])
        if voiced:  # received: 2.0 s
            assert policy.next_window(now=0.0) is None
            policy.feed(np.zeros(int(end * RATE) - policy.received, dtype=np.float32))
        window = policy.next_window(now=0.0)
        assert window is not None and (window.kind, window.end) == ("final", int(end * RATE))
        out = policy.accept(window, result(("hello", 0.5, 1.0), ("there.", 1.1, 1.5)))
        assert [(o.is_final, o.text) for o in out] == [(False, "hello there.")]  # held
        policy.feed(np.zeros(int(2.7 * RATE) - 1 - policy.received, dtype=np.float32))
        assert policy.settle(now=0.0) == []  # 1.2 s after the speech end at 1.5 s is 2.7 s
        policy.feed(np.zeros(1, dtype=np.float32))
        assert [(o.is_final, o.text) for o in policy.settle(now=0.0)] == [(True, "hello there.")]


def test_a_recording_holds_words_across_every_pause_the_context_spans() -> None:
    """`hold_longest` (whole recordings: no latency to keep): the words wait until the silence
    reaches CONTEXT_GAP_S instead of FINAL_HOLD_MS; with holding off they stay final at once."""
    for hold_s in (1.2, 0.0):
        policy = UtterancePolicy(pad_s=0.2, tail_s=0.5, hold_s=hold_s)
        policy.hold_longest()
        policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
        policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])
        window = policy.next_window(now=0.0)
        assert window is not None and window.kind == "final"
        out = policy.accept(window, result(("hello", 0.5, 1.0), ("there.", 1.1, 1.5)))
        if hold_s == 0:
            assert [(o.is_final, o.text) for o in out] == [(True, "hello there.")]
            continue
        assert [(o.is_final, o.text) for o in out] == [(False, "hello there.")]
        policy.feed(np.zeros(int((1.5 + 3.0) * RATE) - 1 - policy.received, dtype=np.float32))
        assert policy.settle(now=0.0) == []  # past FINAL_HOLD_MS, short of the 3 s gap
        policy.feed(np.zeros(1, dtype=np.float32))
        assert [(o.is_final, o.text) for o in policy.settle(now=0.0)] == [(True, "hello there.")]


def test_a_tail_that_never_arrives_is_waited_for_only_as_long_as_it_would_take() -> None:
    """A client that goes quiet after an utterance (no END): the final comes once the rest of the
    tail would have arrived at real-time pace (plus a little), decoded with what there is."""
    policy = UtterancePolicy(pad_s=0.2, tail_s=0.8, hold_s=0)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(int(1.5 * RATE), dtype=np.float32), [SpeechEvent("end", 2 * RATE)])  # received: 2.5 s
    assert policy.next_window(now=10.0) is None
    assert policy.seconds_until_tail(now=10.0) == pytest.approx(0.3 + 0.25)
    assert policy.next_window(now=10.5) is None
    window = policy.next_window(now=10.55)
    assert window is not None and (window.kind, window.start, window.end) == (
        "final",
        RATE // 2 - 3200,
        policy.received,
    )
    out = policy.accept(window, result(("hello", 0.3, 1.5)))  # the speech (0.5-2.0 s) heard to its end
    assert [(o.is_final, o.text) for o in out] == [(True, "hello")]
    assert policy.next_window(now=11.0) is None and policy.seconds_until_tail(now=11.0) is None


def test_the_end_of_the_stream_does_not_wait_for_the_tail() -> None:
    policy = UtterancePolicy(pad_s=0.2, tail_s=0.8, hold_s=0)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 4)])
    window = policy.next_window(now=0.0, finalize_until=policy.received)
    assert window is not None and (window.kind, window.end) == ("final", 2 * RATE)


def test_speech_starting_inside_the_tail_ends_it_at_its_own_pre_roll() -> None:
    """The next utterance begins before the tail is over: the tail stops where its pre-roll begins,
    so the first utterance's final never hears the start of the next one."""
    policy = UtterancePolicy(pad_s=0.2, tail_s=0.8, hold_s=0, context_audio_s=0)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 4)])
    policy.feed(np.zeros(RATE // 2, dtype=np.float32), [SpeechEvent("start", 2 * RATE)])
    window = policy.next_window(now=0.0)
    assert window is not None and (window.kind, window.end) == ("final", 2 * RATE - 3200)


def held_utterance(policy: UtterancePolicy) -> None:
    """Speech from 0.5 s to 1.5 s, decoded as "hello there." and held back (shown as a partial)."""
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    out = policy.accept(window, result(("hello", 0.3, 0.6), ("there.", 0.7, 1.0)))
    assert [(o.is_final, o.text, o.segment_id) for o in out] == [(False, "hello there.", 0)]


def test_an_ended_utterance_waits_out_the_hold_then_becomes_final_as_heard() -> None:
    """The words wait for 1.5 s of silence (counted from its start at 1.5 s), then are final."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    assert policy.settle(now=0.0) == []
    policy.feed(np.zeros(int(0.9 * RATE), dtype=np.float32))  # 2.9 s: 1.4 s of silence
    assert policy.settle(now=0.0) == []
    policy.feed(np.zeros(int(0.1 * RATE), dtype=np.float32))
    out = policy.settle(now=0.0)
    assert [(o.is_final, o.text, o.segment_id, o.start, o.end) for o in out] == [(True, "hello there.", 0, 0.6, 1.3)]
    assert policy.settle(now=10.0) == [] and policy.next_window(now=10.0) is None


def test_held_words_become_final_by_the_clock_when_the_audio_stops() -> None:
    """A client that stops sending audio still gets the final, `hold_s` after it was first due."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    assert policy.settle(now=100.0) == []
    assert policy.seconds_until_settle(now=100.5) == pytest.approx(1.0)
    assert [o.text for o in policy.settle(now=101.5)] == ["hello there."]
    assert policy.seconds_until_settle(now=101.5) is None


def test_a_flush_finalizes_held_words_at_once() -> None:
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    out = policy.settle(now=0.0, finalize_until=policy.received)
    assert [(o.is_final, o.text) for o in out] == [(True, "hello there.")]


def test_speech_resuming_within_the_hold_decodes_the_held_words_again_with_what_follows() -> None:
    """A 1 s pause inside a sentence: the held "there." is heard again as "there," and the sentence
    goes on; the words of the new utterance are held in turn."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])  # 1 s of silence
    assert policy.settle(now=0.0) == []  # the speaker went on: the words wait for the next decode
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", int(3.5 * RATE))])
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    assert (window.start, window.end, window.prefix) == (int(0.3 * RATE), int(3.7 * RATE), "")
    words = (("hello", 0.3, 0.6), ("there,", 0.7, 1.0), ("how", 2.3, 2.5), ("are", 2.6, 2.8), ("you?", 2.9, 3.1))
    out = policy.accept(window, result(*words))
    assert [(o.is_final, o.text, o.segment_id) for o in out] == [(True, "hello there,", 0), (False, "how are you?", 1)]
    policy.feed(np.zeros(2 * RATE, dtype=np.float32))
    assert [(o.is_final, o.text, o.segment_id) for o in policy.settle(now=0.0)] == [(True, "how are you?", 1)]


@pytest.mark.parametrize(
    "words",
    [
        # "there," timed across the pause (1.5 s to 2.5 s): it lies mostly before it, so it is final.
        (("hello", 0.3, 0.6), ("there,", 0.7, 2.2), ("how", 2.2, 2.5), ("are", 2.6, 2.8), ("you?", 2.9, 3.1)),
        # "how" timed from the end of "there," (as Whisper often does): mostly after it, so it waits.
        (("hello", 0.3, 0.6), ("there,", 0.7, 1.0), ("how", 1.0, 3.1), ("are", 3.1, 3.3), ("you?", 3.3, 3.4)),
    ],
)
def test_a_word_timed_across_the_pause_goes_with_the_utterance_it_mostly_lies_in(
    words: tuple[tuple[str, float, float], ...],
) -> None:
    """Which words of the next utterance's final decode wait as the held words is decided by the
    middle of the pause between the two (speech ended at 1.5 s, went on at 2.5 s), not by the
    padded start of the new one: a word timed across the pause belongs where most of it is."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", int(3.5 * RATE))])
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final" and window.start < int(2.3 * RATE)
    out = policy.accept(window, result(*words))
    assert [(o.is_final, o.text, o.segment_id) for o in out] == [(True, "hello there,", 0), (False, "how are you?", 1)]


SENTENCE_END = (("I", 4.5, 4.6), ("probably", 4.6, 5.0), ("sound", 5.1, 5.5), ("different.", 5.6, 6.4))


@pytest.mark.parametrize(
    ("words", "final", "held"),
    [
        # Words ending 2.5 s before the end of the decoded audio (the window is 0.3-7.0 s; word
        # times count from its start) are final at once, up to the last phrase among them
        # ("cold,"); what follows waits for the speaker.
        (
            (("I", 0.6, 0.8), ("have", 0.9, 1.1), ("a", 1.2, 1.3), ("cold,", 1.4, 1.9), ("so", 2.4, 4.4)),
            "I have a cold,",
            "so I probably sound different.",
        ),
        # Six or more settled words go out without waiting for a phrase to end.
        (
            (
                ("I", 0.6, 0.8),
                ("have", 0.9, 1.1),
                ("a", 1.2, 1.3),
                ("bad", 1.4, 1.6),
                ("cold", 1.7, 4.0),
                ("so", 4.05, 4.2),
            ),
            "I have a bad cold so",
            "I probably sound different.",
        ),
    ],
)
def test_only_the_words_near_the_pause_of_a_long_utterance_are_held(
    words: tuple[tuple[str, float, float], ...], final: str, held: str
) -> None:
    """Held words wait to hear how the sentence goes on, which decides only the words next to the
    pause. The final decode of a 6 s utterance (speech 0.5-6.5 s, decoded to 7.0 s) makes the words
    it heard `COMMIT_DELAY_S` of audio after final at once, as a partial's agreed words would be; a
    later decode (with the next utterance, often longer) cannot rewrite them."""
    policy = UtterancePolicy(pad_s=0.2, tail_s=0.5, hold_s=1.5)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(6 * RATE, dtype=np.float32), [SpeechEvent("end", int(6.5 * RATE))])
    window = policy.next_window(now=0.0)
    assert window is not None and (window.kind, window.end) == ("final", 7 * RATE)
    out = policy.accept(window, result(*words, *SENTENCE_END))
    assert [(o.is_final, o.text, o.segment_id) for o in out] == [(True, final, 0), (False, held, 1)]
    # The speaker goes on within the hold: the next decode continues after the final words, with
    # their audio, and hears the held ones again with what follows.
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(7.5 * RATE))])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", int(8.5 * RATE))])
    window = policy.next_window(now=0.0)
    assert window is not None and (window.kind, window.start, window.prefix) == ("final", int(0.3 * RATE), final)


@pytest.mark.parametrize(("resumed_s", "held"), [(2.8, True), (3.2, False)])
def test_whether_held_words_wait_depends_on_when_the_speaker_went_on_not_on_the_decode(
    resumed_s: float, held: bool
) -> None:
    """The final decode of "hello there." (speech ended at 1.5 s, hold 1.5 s) comes back only at
    3.5 s, after the speaker has gone on. Speech that resumed inside the hold (2.8 s) keeps the
    words for the next decode; speech that resumed after it (3.2 s) does not: they are final at
    once, as on a server whose decode had come back sooner."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    policy.feed(np.zeros(RATE + RATE // 2, dtype=np.float32), [SpeechEvent("start", int(resumed_s * RATE))])
    out = policy.accept(window, result(("hello", 0.3, 0.6), ("there.", 0.7, 1.0)))
    assert [(o.is_final, o.text) for o in out] == [(False, "hello there.")]
    out = policy.settle(now=0.0)
    assert [(o.is_final, o.text, o.segment_id) for o in out] == ([] if held else [(True, "hello there.", 0)])


def test_held_words_the_partials_keep_disagreeing_on_are_final_once_settled() -> None:
    """The speaker goes on after a pause, and the partials keep hearing the held words differently
    ("their", "there", "their"): once a partial has heard COMMIT_DELAY_S (2.5 s) past them, they are
    final as that partial heard them, and what follows stays a partial after them."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)  # "hello there." held, ending at 1.3 s
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])
    hypotheses = [
        (0.5, (("hello", 0.3, 0.6), ("their", 0.7, 1.0), ("how", 2.6, 2.8))),
        (0.2, (("hello", 0.3, 0.6), ("there", 0.7, 1.05), ("how", 2.6, 2.8), ("are", 2.9, 3.1))),
        (0.3, (("hello", 0.3, 0.6), ("their", 0.7, 1.05), ("how", 2.6, 2.8), ("are", 2.9, 3.1), ("you", 3.2, 3.4))),
    ]
    sent = []
    for step, (more_s, words) in enumerate(hypotheses):
        policy.feed(np.zeros(round(more_s * RATE), dtype=np.float32))
        window = policy.next_window(now=10.0 * step)
        assert window is not None and (window.kind, window.start) == ("partial", int(0.3 * RATE))
        sent.append([(o.is_final, o.text) for o in policy.accept(window, result(*words))])
    assert sent == [
        [(False, "hello their how")],  # heard to 3.5 s
        [(False, "hello there how are")],  # to 3.7 s: not yet 2.5 s past 1.3 s
        [(True, "hello their"), (False, "how are you")],  # to 4.0 s
    ]
    policy.feed(np.zeros(RATE // 2, dtype=np.float32))
    window = policy.next_window(now=30.0)
    assert window is not None and window.prefix == "hello their"


def stretched_policy() -> UtterancePolicy:
    """Partials every 0.2 s as configured, stretched to an hour by a (very) busy engine."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5, partial_interval_s=0.2, max_partial_interval_s=3600.0)
    policy.partial_round_trip(5000.0)
    assert (policy.partial_interval_s, policy.refresh_interval_s) == (3600.0, 3600.0)
    return policy


def tenths_of_partials(
    policy: UtterancePolicy, tenths: range, hypotheses: dict[float, tuple[Heard, ...]]
) -> tuple[list[float], list[list[tuple[bool, str]]]]:
    """Feed a tenth of a second at a time, at real-time pace: when a partial was due, and what each
    partial (decoded as `hypotheses` says for its end) sent."""
    due: list[float] = []
    sent: list[list[tuple[bool, str]]] = []
    for tenth in tenths:
        policy.feed(np.zeros(RATE // 10, dtype=np.float32))
        if policy.seconds_until_partial(now=tenth / 10) == 0.0:
            due.append(tenth / 10)
        window = policy.next_window(now=tenth / 10)
        if window is not None:
            assert window.kind == "partial" and window.end == tenth * RATE // 10
            sent.append([(o.is_final, o.text) for o in policy.accept(window, result(*hypotheses[tenth / 10]))])
    return due, sent


def test_held_words_get_the_partials_they_wait_for_whatever_the_cadence() -> None:
    """The cadence stretched to an hour: the held "hello there." (ending at 1.3 s) still gets a
    partial once the speech that follows has gone on for HELD_ALIKE_S after its pre-roll (3.5 s;
    none before, as a partial of less would not hear that speech after them), and another once
    COMMIT_DELAY_S has passed after them (3.8 s); none in between."""
    policy = stretched_policy()
    held_utterance(policy)
    policy.feed(np.zeros(RATE // 2, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])
    hypotheses: dict[float, tuple[Heard, ...]] = {
        3.5: (("hello", 0.3, 0.6), ("their", 0.7, 1.0), ("how", 2.6, 2.8), ("are", 2.9, 3.1)),
        3.8: (("hello", 0.3, 0.6), ("there", 0.7, 1.05), ("how", 2.6, 2.8), ("are", 2.9, 3.1), ("you", 3.2, 3.4)),
    }
    due, sent = tenths_of_partials(policy, range(26, 41), hypotheses)  # 2.6 s to 4.0 s
    assert due == [3.5, 3.8]
    assert sent == [
        [(False, "hello their how are")],  # not heard alike: they wait
        [(True, "hello there"), (False, "how are you")],  # 2.5 s past them: final as this partial heard them
    ]


def test_held_words_the_model_was_unsure_of_wait_twice_as_long_for_what_follows() -> None:
    """Held "the Criccorpus." (a token of the last word at 8 %, ending at 1.6 s), and the speaker
    goes on at 2.5 s. A sure word heard alike a second into that speech is final then (tests
    above); this one is not, and the partials it waits for are one at 3.5 s (heard alike: it waits)
    and one 5 s past it (2 x COMMIT_DELAY_S), at 6.6 s, whose reading is what becomes final."""
    policy = stretched_policy()
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    held: tuple[Heard, ...] = (("the", 0.3, 0.6, 0.9), ("Criccorpus.", 0.7, 1.3, 0.08))
    assert [(o.is_final, o.text) for o in policy.accept(window, result(*held))] == [(False, "the Criccorpus.")]
    policy.feed(np.zeros(RATE // 2, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])
    hypotheses: dict[float, tuple[Heard, ...]] = {
        3.5: (*held, ("how", 2.6, 2.8, 0.9), ("are", 2.9, 3.4, 0.9)),
        6.6: (("the", 0.3, 0.6), ("sick", 0.7, 0.9), ("corpus.", 0.9, 1.3), ("How", 2.6, 2.8), ("are", 2.9, 3.1)),
    }
    due, sent = tenths_of_partials(policy, range(26, 69), hypotheses)  # 2.6 s to 6.8 s
    assert due == [3.5, 6.6]
    assert sent == [
        [(False, "the Criccorpus. how are")],  # heard alike, but unsure: it waits
        [(True, "the sick corpus."), (False, "How are")],  # 5 s past it: final as this partial heard it
    ]


def test_a_refused_partial_that_held_words_waited_for_is_not_asked_again_at_once() -> None:
    """The engine is too busy for the partial due at 3.5 s: the policy does not ask for it again
    and again; the next one held words wait for (at 3.8 s) is asked for once its audio is there."""
    policy = stretched_policy()
    held_utterance(policy)
    policy.feed(np.zeros(int(1.5 * RATE), dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])  # to 3.5 s
    window = policy.next_window(now=3.5)
    assert window is not None and (window.kind, window.end) == ("partial", int(3.5 * RATE))
    assert policy.accept(window, None) == []  # refused
    policy.feed(np.zeros(RATE // 10, dtype=np.float32))
    assert policy.next_window(now=3.7) is None and policy.seconds_until_partial(now=3.7) == pytest.approx(3599.8)
    policy.feed(np.zeros(RATE // 5, dtype=np.float32))  # to 3.8 s
    window = policy.next_window(now=3.8)
    assert window is not None and (window.kind, window.end) == ("partial", int(3.8 * RATE))


def test_held_word_partials_keep_the_configured_interval() -> None:
    """PARTIAL_INTERVAL_MS is the least spacing of partials, for the ones held words wait for too:
    with an hour configured, the held words get none after the first partial of the utterance."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5, partial_interval_s=3600.0)
    held_utterance(policy)
    policy.feed(np.zeros(int(1.5 * RATE), dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])  # to 3.5 s
    window = policy.next_window(now=3.5)
    assert window is not None and window.kind == "partial"
    policy.accept(window, result(("hello", 0.3, 0.6), ("their", 0.7, 1.0), ("how", 2.6, 2.8)))
    policy.feed(np.zeros(RATE, dtype=np.float32))  # to 4.5 s: 2.5 s past the held words and more
    assert policy.next_window(now=4.5) is None and policy.seconds_until_partial(now=4.5) == pytest.approx(3599.0)


def test_the_first_partial_of_an_utterance_waits_for_half_a_second_of_speech() -> None:
    """Speech heard from 0.9 s (its pre-roll from 0.5 s): no partial of the pre-roll and the first
    tenths of a second; the first one at 1.4 s, covering the pre-roll too."""
    policy = UtterancePolicy(pad_s=0.4)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(0.9 * RATE))])
    for _ in range(4):  # 1.0 s to 1.3 s
        assert policy.next_window(now=10.0) is None and policy.seconds_until_partial(now=10.0) is None
        policy.feed(np.zeros(RATE // 10, dtype=np.float32))
    assert policy.seconds_until_partial(now=10.0) == 0.0
    window = policy.next_window(now=10.0)
    assert window is not None and (window.kind, window.start, window.end) == ("partial", RATE // 2, int(1.4 * RATE))


def test_no_partial_is_cut_in_a_pause_of_the_speaker() -> None:
    """Speech from 0.5 s; a partial is due from 1.0 s, but the speaker has paused since 0.9 s (the
    voice activity says so): none is cut while the pause lasts a tenth of a second or more, and the
    first frame of speech after it brings it back at once."""
    policy = UtterancePolicy(pad_s=0.2)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    assert policy.seconds_until_partial(now=10.0) == 0.0
    policy.feed(np.zeros(0, dtype=np.float32), (), silent_since=int(0.95 * RATE))  # 50 ms into a pause
    assert policy.seconds_until_partial(now=10.0) == 0.0
    policy.feed(np.zeros(RATE // 10, dtype=np.float32), (), silent_since=int(0.95 * RATE))
    assert policy.seconds_until_partial(now=10.0) is None and policy.next_window(now=10.0) is None
    policy.feed(np.zeros(RATE // 10, dtype=np.float32), (), silent_since=None)  # speech again
    window = policy.next_window(now=10.0)
    assert window is not None
    assert (window.kind, window.start, window.end) == ("partial", int(0.3 * RATE), int(1.2 * RATE))


HELLO, THERE = ("hello", 0.3, 0.6), ("there.", 0.7, 1.0)


@pytest.mark.parametrize(
    ("heard", "sent"),
    [  # heard as before, a second into what follows: final at once
        ((HELLO, THERE, ("how", 2.6, 2.8), ("are", 2.9, 3.4)), [(True, "hello there."), (False, "how are")]),
        # what follows changed them: they wait
        ((HELLO, ("there,", 0.7, 1.0), ("how", 2.6, 2.8)), [(False, "hello there, how")]),
        # none of what follows heard: the previous utterance is let go, its words final as heard
        ((HELLO, THERE), [(True, "hello there.")]),
    ],
)
def test_held_words_heard_again_alike_after_a_second_of_what_follows_are_final(
    heard: tuple[tuple[str, float, float], ...], sent: list[tuple[bool, str]]
) -> None:
    """The speaker goes on after a pause at 2.5 s; the partial at 3.5 s (a second after the pre-roll)
    hears the held "hello there." again."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])
    policy.feed(np.zeros(RATE // 2, dtype=np.float32))  # to 3.5 s
    window = policy.next_window(now=10.0)
    assert window is not None and (window.kind, window.end) == ("partial", int(3.5 * RATE))
    assert [(o.is_final, o.text) for o in policy.accept(window, result(*heard))] == sent


def test_finals_due_are_not_lost_when_a_partial_is_skipped() -> None:
    """Held words released by a long pause go out with the next answer, even a skipped partial's."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    policy.feed(np.zeros(4 * RATE, dtype=np.float32))  # past CONTEXT_GAP_S: the held words are due
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(6.2 * RATE))])
    window = policy.next_window(now=10.0)
    assert window is not None and window.kind == "partial"
    out = policy.accept(window, None)  # the engine was too busy for this partial
    assert [(o.is_final, o.text, o.segment_id) for o in out] == [(True, "hello there.", 0)]


def test_finalizing_with_speech_queued_after_held_words_decodes_them_together() -> None:
    """END arrives while the next utterance is still undecoded: the held words are not cut off
    as they stand but decoded once more with it, then everything is final."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", int(3.5 * RATE))])
    end = policy.received
    assert policy.settle(now=0.0, finalize_until=end) == []
    window = policy.next_window(now=0.0, finalize_until=end)
    assert window is not None and window.start == int(0.3 * RATE)
    out = policy.accept(window, result(("hello", 0.3, 0.6), ("there,", 0.7, 1.0), ("friend.", 2.3, 2.6)))
    assert [(o.is_final, o.text) for o in out] == [(True, "hello there,"), (False, "friend.")]
    assert [(o.is_final, o.text) for o in policy.settle(now=0.0, finalize_until=end)] == [(True, "friend.")]
    assert policy.next_window(now=0.0, finalize_until=end) is None


def test_a_decode_that_rewrites_the_held_words_replaces_them() -> None:
    """The next decode hears the start differently ("I don't know how…" for "Don't know."): its words
    stand, none of the held ones is kept beside them."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", int(3.5 * RATE))])
    window = policy.next_window(now=0.0)
    assert window is not None
    out = policy.accept(window, result(("oh", 0.2, 0.3), ("hello", 0.35, 0.6), ("there", 0.7, 1.0), ("you", 2.3, 2.6)))
    assert [(o.is_final, o.text) for o in out] == [(True, "oh hello there"), (False, "you")]


def test_a_decode_without_the_held_words_finalizes_them_first() -> None:
    """The next decode is judged silence: the held words are not lost, they are final as first heard."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", int(2.5 * RATE))])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", int(3.5 * RATE))])
    window = policy.next_window(now=0.0)
    assert window is not None
    out = policy.accept(window, result(("hmm", 2.4, 2.6), no_speech_prob=0.99, avg_logprob=-2.0))
    assert [(o.is_final, o.text, o.segment_id) for o in out] == [(True, "hello there.", 0)]


def test_a_long_pause_finalizes_held_words_before_letting_the_audio_go() -> None:
    """Speech resumes only after 4 s: the held words are final first; the new decode starts afresh."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=1.5)
    held_utterance(policy)
    policy.feed(np.zeros(int(4 * RATE), dtype=np.float32), [SpeechEvent("start", int(5.5 * RATE))])
    assert [(o.is_final, o.text) for o in policy.settle(now=0.0)] == [(True, "hello there.")]
    window = policy.next_window(now=0.0, finalize_until=policy.received)
    assert window is not None and (window.start, window.prefix, window.context) == (int(5.3 * RATE), "", "hello there.")


def utterance_then_pause(policy: UtterancePolicy, pause_s: float) -> None:
    """Speech from 0.5 s to 1.5 s, finalized as "hello there.", then `pause_s` of silence and speech again."""
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final" and window.prefix == ""
    out = policy.accept(window, result(("hello", 0.3, 0.6), ("there.", 0.7, 1.0)))
    assert [o.text for o in out] == ["hello there."]
    restart = int((1.5 + pause_s) * RATE)
    policy.feed(np.zeros(restart - policy.received, dtype=np.float32))
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", restart)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", restart + RATE)])


def test_a_short_pause_decodes_the_next_utterance_after_the_previous_one() -> None:
    """After a pause of under 3 s the previous utterance's audio and words lead the next decode."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0)
    utterance_then_pause(policy, pause_s=1.5)
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    assert (window.start, window.prefix) == (int(0.3 * RATE), "hello there.")
    assert window.end == int(4.2 * RATE) and len(window.audio) == window.end - window.start
    out = policy.accept(window, result(("how", 2.8, 3.0), ("are", 3.1, 3.3), ("you?", 3.4, 3.7), after_prefix=True))
    assert [(o.text, o.start, o.end) for o in out] == [("how are you?", 3.1, 4.0)]
    assert policy.pending <= int(10.4 * RATE)


def test_a_long_pause_lets_the_previous_utterance_go() -> None:
    """After more than 3 s of silence only the text stays, as the prompt; the audio is dropped."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0)
    utterance_then_pause(policy, pause_s=4.0)
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    assert (window.start, window.prefix, window.context) == (int(5.3 * RATE), "", "hello there.")


def test_an_utterance_the_decode_after_the_previous_one_did_not_hear_is_decoded_on_its_own() -> None:
    """Given "hello there." as the prefix, the model ends its text at once (as Whisper may after a
    pause): the 1 s utterance is decoded again without the previous one, its words are final, and
    the previous utterance's words are the prompt."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0)
    utterance_then_pause(policy, pause_s=1.5)
    window = policy.next_window(now=0.0)
    assert window is not None and (window.start, window.prefix) == (int(0.3 * RATE), "hello there.")
    assert policy.accept(window, result(after_prefix=True)) == []
    again = policy.next_window(now=0.0)
    assert again is not None and again.kind == "final"
    assert (again.start, again.end, again.prefix, again.context) == (
        int(2.8 * RATE),
        int(4.2 * RATE),
        "",
        "hello there.",
    )
    out = policy.accept(again, result(("how", 0.1, 0.3), ("are", 0.4, 0.6), ("you?", 0.7, 1.0)))
    assert [(o.is_final, o.text, o.segment_id, o.start, o.end) for o in out] == [(True, "how are you?", 1, 2.9, 3.8)]
    assert policy.stats.heard_again == 1 and policy.next_window(now=0.0) is None


def test_an_utterance_decoded_on_its_own_that_is_heard_as_nothing_is_not_decoded_again() -> None:
    """Voice activity the model hears no words in, without a previous utterance before it, is noise."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0, context_audio_s=0)
    utterance_then_pause(policy, pause_s=1.5)
    window = policy.next_window(now=0.0)
    assert window is not None and window.prefix == ""
    assert policy.accept(window, result()) == []
    assert policy.stats.heard_again == 0 and policy.next_window(now=0.0) is None


def test_speech_after_the_words_a_final_decode_stopped_at_is_decoded_again() -> None:
    """The model stops after "one two" although speech goes on for 3 s more: those words are final
    and the rest of the utterance is decoded from where they end."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0)
    policy.feed(
        np.zeros(5 * RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2), SpeechEvent("end", int(4.5 * RATE))]
    )
    window = policy.next_window(now=0.0, finalize_until=None)
    assert window is not None and window.kind == "final"
    out = policy.accept(window, result(("one", 0.4, 0.8), ("two", 0.9, 1.4)))
    assert [(o.is_final, o.text) for o in out] == [(True, "one two")]
    again = policy.next_window(now=0.0)
    assert again is not None and (again.start, again.end, again.prefix) == (int(1.7 * RATE), int(4.7 * RATE), "")
    out = policy.accept(again, result(("three", 0.2, 0.6), ("four.", 2.5, 3.0)))
    assert [(o.is_final, o.text, o.segment_id) for o in out] == [(True, "three four.", 1)]
    assert policy.next_window(now=0.0) is None


def test_a_flush_decodes_again_the_speech_its_decode_stopped_before() -> None:
    """A flush 3 s into speech whose decode stops after the first half second of it: the rest is
    decoded again on its own before the flush is over."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0, interim_results=False)
    policy.feed(np.zeros(4 * RATE, dtype=np.float32), [SpeechEvent("start", RATE)])
    window = policy.next_window(now=0.0, finalize_until=policy.received)
    assert window is not None and (window.kind, window.start, window.end) == ("final", int(0.8 * RATE), 4 * RATE)
    assert [o.text for o in policy.accept(window, result(("one", 0.4, 0.9)))] == ["one"]
    again = policy.next_window(now=0.0, finalize_until=policy.received)
    assert again is not None and (again.kind, again.start, again.end, again.prefix) == (
        "final",
        int(1.7 * RATE),
        4 * RATE,
        "",
    )
    assert [o.text for o in policy.accept(again, result(("two", 0.3, 0.8), ("three", 1.2, 2.0)))] == ["two three"]
    assert policy.next_window(now=0.0, finalize_until=policy.received) is None


def test_an_utterance_is_decoded_again_at_most_three_times() -> None:
    """A model that always stops after one word costs four decodes of a 10 s utterance, not forty."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0)
    policy.feed(np.zeros(11 * RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2), SpeechEvent("end", 10 * RATE)])
    finals: list[str] = []
    while (window := policy.next_window(now=0.0)) is not None:
        assert window.kind == "final"
        finals += [o.text for o in policy.accept(window, result((f"w{len(finals)}", 0.1, 0.5)))]
    assert finals == ["w0", "w1", "w2", "w3"] and policy.stats.heard_again == 3


def partial_after_a_pause() -> tuple[UtterancePolicy, Window]:
    """ "hello there." final (0.5-1.5 s), a 1.5 s pause, 1.5 s of new speech: the partial due now."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])
    window = policy.next_window(now=0.0)
    assert window is not None
    policy.accept(window, result(("hello", 0.3, 0.6), ("there.", 0.7, 1.0)))
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", 3 * RATE)])
    policy.feed(np.zeros(int(1.5 * RATE), dtype=np.float32))
    partial = policy.next_window(now=10.0)
    assert partial is not None and partial.kind == "partial" and partial.prefix == "hello there."
    return policy, partial


def test_a_partial_after_the_previous_utterance_that_hears_none_of_the_new_one_lets_it_go() -> None:
    """Partials decoded after "hello there." keep coming back with nothing new though the speaker has
    talked for over a second: the next partial decodes the new speech on its own, at once."""
    policy, partial = partial_after_a_pause()
    assert policy.accept(partial, result(after_prefix=True)) == []
    alone = policy.next_window(now=10.0)
    assert alone is not None and alone.kind == "partial"
    assert (alone.start, alone.prefix, alone.context) == (int(2.8 * RATE), "", "hello there.")
    out = policy.accept(alone, result(("how", 0.3, 0.5), ("are", 0.6, 0.8)))
    assert [(o.is_final, o.text) for o in out] == [(False, "how are")]


def test_a_partial_that_hears_the_new_speech_after_the_previous_utterance_keeps_it() -> None:
    policy, partial = partial_after_a_pause()
    out = policy.accept(partial, result(("how", 3.1, 3.4), ("are", 3.5, 3.8), after_prefix=True))
    assert [(o.is_final, o.text) for o in out] == [(False, "how are")]
    assert policy.stats.heard_again == 0 and policy.next_window(now=10.0) is None


def test_context_audio_off_starts_each_utterance_afresh() -> None:
    """CONTEXT_AUDIO_S=0: every utterance is decoded on its own, with the text before it as the prompt."""
    policy = UtterancePolicy(pad_s=0.2, context_audio_s=0)
    utterance_then_pause(policy, pause_s=1.0)
    window = policy.next_window(now=0.0)
    assert window is not None
    assert (window.start, window.prefix, window.context) == (int(2.3 * RATE), "", "hello there.")


def test_flush_inside_speech_finalizes_up_to_the_flush() -> None:
    """A flush cuts the utterance: a final up to the flush point; speech after it continues."""
    policy = started_policy(seconds=2.0)
    window = policy.next_window(now=0.0, finalize_until=policy.received)
    assert window is not None and (window.kind, window.start, window.end) == ("final", 0, 2 * RATE)
    policy.accept(window, result(("one", 0.2, 1.8)))
    assert policy.next_window(now=0.0, finalize_until=2 * RATE) is None
    policy.feed(np.full(RATE, 0.1, dtype=np.float32))
    window = policy.next_window(now=5.0)
    assert window is not None and (window.kind, window.start, window.end) == ("partial", 0, 3 * RATE)
    assert window.prefix == "one"  # the decode goes on after the flushed words, hearing them again


def test_full_buffer_commits_all_but_the_last_second() -> None:
    """Speech with no agreement reaching 30 s: words ending before the last second are committed."""
    policy = started_policy(seconds=31.0)
    window = policy.next_window(now=0.0)
    assert window is not None and (window.kind, window.end - window.start) == ("cap", 30 * RATE)
    out = policy.accept(window, result(("early", 1.0, 1.5), ("late", 29.2, 29.6)))
    assert [(o.is_final, o.text) for o in out] == [(True, "early")]
    next_window = policy.next_window(now=100.0)
    assert next_window is not None and next_window.start == int(1.5 * RATE)


def test_silence_verdicts_and_loops_are_guarded() -> None:
    """No-speech and degenerate decodes are dropped; a looping tail is cut before the loop."""
    policy = started_policy(seconds=1.0)
    window = policy.next_window(now=0.0, finalize_until=policy.received)
    assert window is not None
    silence = result(("thank", 0.1, 0.2), ("you", 0.2, 0.3), avg_logprob=-1.5, no_speech_prob=0.9)
    assert policy.accept(window, silence) == []
    assert policy.stats.dropped_no_speech == 1

    policy = started_policy(seconds=3.0)
    window = policy.next_window(now=0.0, finalize_until=policy.received)
    assert window is not None
    looping = [("we", 0.0, 0.1), ("said", 0.1, 0.2)] + [
        (word, 0.2 + i * 0.1, 0.3 + i * 0.1) for i, word in enumerate(["go", "on"] * 5)
    ]
    out = policy.accept(window, result(*looping))
    assert [o.text for o in out] == ["we said go on"]
    assert policy.stats.loops_cut == 1


def test_committed_text_that_leaves_the_buffer_becomes_the_bounded_prompt() -> None:
    """Trimmed committed words become context: the most recent ≤ context_chars characters."""
    policy = UtterancePolicy(trim_s=2.0, keep_s=0, context_chars=14)
    policy.feed(np.zeros(0, dtype=np.float32), [SpeechEvent("start", 0)])
    words = [(f"word{i}.", i * 0.5, i * 0.5 + 0.4) for i in range(8)]
    seconds = 0
    for step in range(2):
        seconds += 2
        policy.feed(np.full(2 * RATE, 0.1, dtype=np.float32))
        window = policy.next_window(now=float(step * 10))
        assert window is not None
        policy.accept(window, result(*[w for w in words if w[2] <= seconds - window.start / RATE]))
    window = policy.next_window(now=100.0, finalize_until=policy.received)
    assert window is not None
    assert window.context == "word1. word2."
    assert len(window.context) <= 14


@pytest.mark.parametrize(
    ("keep_s", "start_s", "prefix", "context"),
    [
        (1.5, 1.4, "w3. w4. w5.", "w0. w1. w2."),  # the words starting in the last 1.5 s stay
        (10.0, 0.9, "w2. w3. w4. w5.", "w0. w1."),  # at most half the 4 s buffer stays
        (0.0, 2.9, "", "w0. w1. w2. w3. w4. w5."),  # cut at the last committed word: text only
    ],
)
def test_a_long_buffer_is_cut_keeping_the_audio_of_its_last_committed_words(
    keep_s: float, start_s: float, prefix: str, context: str
) -> None:
    """Past `trim_s` the buffer is cut at a committed word's end; the committed words of the last
    `keep_s` (at most half the buffer) stay in it as the prefix, the earlier ones become the prompt."""
    words = [(f"w{i}.", i * 0.5, i * 0.5 + 0.4) for i in range(9)]
    policy = started_policy(seconds=3.0, trim_s=4.0, keep_s=keep_s, settle_age_s=0.0)
    first = policy.next_window(now=1.0)
    assert first is not None and (first.start, first.end) == (0, 3 * RATE)
    policy.accept(first, result(*words[:6]))
    policy.feed(np.full(int(1.5 * RATE), 0.1, dtype=np.float32))
    second = policy.next_window(now=2.0)
    assert second is not None and (second.start, second.end) == (0, int(4.5 * RATE))
    out = policy.accept(second, result(*words))
    assert [(o.is_final, o.text) for o in out] == [
        (True, "w0. w1. w2. w3. w4. w5."),
        (False, "w6. w7. w8."),
    ]
    policy.feed(np.full(RATE, 0.1, dtype=np.float32))
    third = policy.next_window(now=3.0)
    assert third is not None and third.kind == "partial"
    assert (third.start, third.end) == (round(start_s * RATE), int(5.5 * RATE))
    assert (third.prefix, third.context) == (prefix, context)
    assert len(third.audio) == third.end - third.start


def test_interim_results_off_decodes_nothing_until_the_utterance_ends() -> None:
    """Without interim results there are no partial decodes at all: the open utterance waits (also
    for the clock), and its one decode when it ends gives the final; a full buffer still gives one."""
    policy = started_policy(interim_results=False, max_window_s=4.0, hold_s=0)
    for now in (1.0, 2.0, 30.0):
        assert policy.next_window(now=now) is None
        assert policy.seconds_until_partial(now) is None
    policy.feed(np.full(2 * RATE, 0.1, dtype=np.float32))  # 5 s: past the 4 s buffer
    cap = policy.next_window(now=31.0)
    assert cap is not None and (cap.kind, cap.start, cap.end) == ("cap", 0, 4 * RATE)
    out = policy.accept(cap, result(("a", 0.1, 0.4), ("b.", 0.5, 0.8), ("c", 3.5, 3.9)))
    assert [(o.is_final, o.text) for o in out] == [(True, "a b.")]  # "c" is too close to the cut
    policy.feed(np.zeros(RATE // 2, dtype=np.float32), [SpeechEvent("end", 5 * RATE)])  # after 0.5 s of silence
    final = policy.next_window(now=32.0)
    assert final is not None and final.kind == "final" and policy.stats.windows["partial"] == 0
    out = policy.accept(final, result(("c", 0.5, 0.9), ("d.", 1.0, 1.4)))
    assert [(o.is_final, o.text) for o in out] == [(True, "c d.")]


def test_without_vad_everything_is_one_region() -> None:
    """VAD off: all audio is decoded; finals at flush and at the window limit."""
    policy = UtterancePolicy(vad_enabled=False, max_window_s=3.0, trim_s=3.0)
    policy.feed(np.zeros(RATE, dtype=np.float32))
    window = policy.next_window(now=0.0)
    assert window is not None and (window.kind, window.start, window.end) == ("partial", 0, RATE)


def test_a_failed_decode_keeps_going() -> None:
    """A final whose decode failed sends nothing and moves on; the next audio is decoded."""
    policy = started_policy(seconds=1.0)
    window = policy.next_window(now=0.0, finalize_until=policy.received)
    assert window is not None
    assert policy.accept(window, None) == []
    assert policy.next_window(now=0.0, finalize_until=policy.received) is None


@pytest.mark.parametrize("seed", [1, 2])
def test_short_streams_with_small_frames_are_exact(seed: int) -> None:
    """Two minutes with tiny frames (down to 20 ms): the finals are still exactly the spoken words."""
    audio, spoken = speech_block(seed=seed, seconds=120.0)
    run = simulate(audio, UtterancePolicy(partial_interval_s=0.5), BurstTranscriber(), seed=seed, max_frame_s=0.1)
    assert run.final_words() == [w.text for w in spoken]
    assert any(not o.is_final for o in run.outputs)


def test_a_repeated_word_after_a_commit_is_kept_but_a_reheard_tail_is_not() -> None:
    """ "go go": the second "go" starts after the committed one and is new; a decode that starts at
    the committed end and catches the tail of the last word does not repeat it."""
    agreement = LocalAgreement()
    agreement.insert([Word("go,", 1.0, 1.3)])
    assert agreement.insert([Word("go,", 1.0, 1.3), Word("go", 1.38, 1.7)]) == [Word("go,", 1.0, 1.3)]
    assert agreement.finish([Word("go", 1.38, 1.7), Word("on", 1.8, 2.0)]) == [
        Word("go", 1.38, 1.7),
        Word("on", 1.8, 2.0),
    ]
    assert agreement.finish([Word("on", 2.0, 2.1), Word("now", 2.2, 2.5)]) == [Word("now", 2.2, 2.5)]


def test_a_repeat_at_the_commit_is_read_the_way_the_hypothesis_before_it_continued() -> None:
    """ "more words, words," is committed while the last hypothesis has two more "words" after it.
    A decode forced to continue after it writes three: one of them is the committed word heard
    again, not two. A decode that catches the tail of "more" drops that one."""

    def words(*texts: str, start: float = 1.0) -> list[Word]:
        return [Word(text, start + 0.4 * i, start + 0.4 * i + 0.35) for i, text in enumerate(texts)]

    agreement = LocalAgreement()
    heard = words("more", "words,", "words,", "words,", "words.")
    agreement.insert(heard, heard_until=4.8)
    assert agreement.insert(heard, heard_until=4.8) == heard[:3]  # "words." ends too late to settle
    assert agreement.tail == heard[3:]
    after = words("words,", "words,", "words.", start=2.15)
    assert agreement.fresh(after, after_prefix=True) == after[1:]

    agreement = LocalAgreement()
    agreement.insert(words("some", "more", "words", "and"), heard_until=1.0)
    assert agreement.insert(words("some", "more,", "words", "and"), heard_until=4.5) == words("some", "more,")
    assert agreement.fresh(words("more", "words", "and", start=1.75), after_prefix=True) == words(
        "words", "and", start=2.15
    )


def test_the_partial_cadence_follows_the_round_trip_within_its_bounds() -> None:
    """Twice the running round-trip estimate while no words are shown, four times once a partial
    shows words; never below the setting nor above the ceiling; a refused partial backs off at
    once; a fast engine brings the intervals back down."""
    policy = UtterancePolicy(partial_interval_s=1.0, max_partial_interval_s=4.0)
    policy.partial_round_trip(0.2)
    assert (policy.partial_interval_s, policy.refresh_interval_s) == (1.0, 1.0)  # fast: the setting stands
    policy.partial_round_trip(1.0)  # estimate 0.6 s
    assert (policy.partial_interval_s, policy.refresh_interval_s) == pytest.approx((1.2, 2.4))
    policy.partial_round_trip(None)  # refused: counted as a round trip of the current interval
    assert (policy.partial_interval_s, policy.refresh_interval_s) == pytest.approx((1.8, 3.6))
    for _ in range(10):
        policy.partial_round_trip(5.0)
    assert (policy.partial_interval_s, policy.refresh_interval_s) == (4.0, 4.0)
    for _ in range(20):
        policy.partial_round_trip(0.1)
    assert (policy.partial_interval_s, policy.refresh_interval_s) == (1.0, 1.0)
    started = started_policy(partial_interval_s=1.0, max_partial_interval_s=8.0)
    started.partial_round_trip(1.0)  # 2 s while nothing is shown, 4 s once something is
    first = started.next_window(now=10.0)
    assert first is not None and first.kind == "partial"
    started.accept(first, result(("a", 0.1, 0.4)))  # "a" is shown
    started.feed(np.full(RATE, 0.1, dtype=np.float32))
    assert started.next_window(now=13.5) is None and started.seconds_until_partial(13.5) == 0.5
    second = started.next_window(now=14.0)
    assert second is not None
    started.accept(second, result())  # nothing heard: nothing shown
    started.feed(np.full(RATE, 0.1, dtype=np.float32))
    assert started.next_window(now=15.5) is None and started.seconds_until_partial(15.5) == 0.5
    assert started.next_window(now=16.0) is not None
    slow = UtterancePolicy(partial_interval_s=3600.0, max_partial_interval_s=4.0)  # the ceiling is never below it
    slow.partial_round_trip(0.5)
    assert (slow.partial_interval_s, slow.refresh_interval_s) == (3600.0, 3600.0)


def cut_and_finalize(policy: UtterancePolicy, heard: TranscriptionResult) -> list[SegmentText]:
    """What a shutdown does: cut at the last sample received, end the speech there, finalize."""
    received = policy.received
    policy.cut(received)
    policy.feed(np.zeros(0, dtype=np.float32), [SpeechEvent("end", received)])
    window = policy.next_window(now=0.0, finalize_until=received)
    assert window is not None and (window.kind, window.end) == ("final", received)
    out = policy.accept(window, heard)
    out += policy.settle(now=0.0, finalize_until=received)
    assert policy.next_window(now=0.0, finalize_until=received) is None
    return out


def test_a_cut_in_mid_utterance_resumes_from_the_utterance_start() -> None:
    """A shutdown in mid-utterance: the held words of the previous utterance and the cut one's
    words become separate finals, and the resume point is the cut utterance's start (its pre-roll
    included), where a new session hears it whole."""
    policy = UtterancePolicy(pad_s=0.2)
    held_utterance(policy)  # "hello there." from 0.5 s to 1.5 s, held
    policy.feed(np.full(RATE // 2, 0.0, dtype=np.float32))
    policy.feed(np.full(2 * RATE, 0.1, dtype=np.float32), [SpeechEvent("start", 2 * RATE + RATE // 2)])
    heard = result(("hello", 0.3, 0.6), ("there.", 0.7, 1.2), ("how", 2.5, 2.8), ("are", 2.9, 3.2), ("yo", 4.3, 4.5))
    out = cut_and_finalize(policy, heard)
    assert [(o.segment_id, o.is_final, o.text) for o in out if o.is_final] == [
        (0, True, "hello there."),
        (1, True, "how are yo"),
    ]
    assert (policy.resume.segment_id, policy.resume.sample) == (1, round(2.3 * RATE))


def test_the_resent_audio_never_reaches_back_into_the_previous_utterance() -> None:
    """After a short pause the cut utterance's pre-roll would overlap the padding after the one
    before (and with it that one's last sounds): the resent audio starts after that padding."""
    policy = UtterancePolicy(pad_s=0.4)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])  # padded to 1.9 s
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    policy.accept(window, result(("hello", 0.3, 0.6), ("there.", 0.7, 1.0)))  # held
    policy.feed(np.full(2 * RATE, 0.1, dtype=np.float32), [SpeechEvent("start", 2 * RATE)])  # pre-roll from 1.6 s
    heard = result(("hello", 0.5, 0.8), ("there.", 0.9, 1.3), ("how", 1.95, 2.2), ("are", 2.3, 2.6), ("yo", 3.4, 3.6))
    out = cut_and_finalize(policy, heard)
    assert [(o.segment_id, o.text) for o in out if o.is_final] == [(0, "hello there."), (1, "how are yo")]
    assert (policy.resume.segment_id, policy.resume.sample) == (1, round(1.9 * RATE))


def test_a_cut_replaces_the_finals_the_utterance_already_had() -> None:
    """Words of the cut utterance that were final before the cut are heard again too: the resume
    point names the first of them."""
    policy = UtterancePolicy(pad_s=0.2)
    policy.feed(np.zeros(RATE, dtype=np.float32))
    policy.feed(np.full(3 * RATE, 0.1, dtype=np.float32), [SpeechEvent("start", RATE)])
    first = policy.next_window(now=1.0)
    assert first is not None and first.start == round(0.8 * RATE)
    policy.accept(first, result(("a", 0.2, 0.5), ("b,", 0.6, 1.0), ("x", 1.1, 1.3)))
    policy.feed(np.full(RATE, 0.1, dtype=np.float32))
    second = policy.next_window(now=2.0)
    assert second is not None
    out = policy.accept(second, result(("a", 0.2, 0.5), ("b,", 0.6, 1.0), ("c", 1.1, 1.4), ("d", 2.0, 2.3)))
    assert [(o.segment_id, o.is_final, o.text) for o in out] == [(0, True, "a b,"), (1, False, "c d")]
    out = cut_and_finalize(policy, result(("c", 1.9, 2.2), ("d", 2.8, 3.1), after_prefix=True))
    assert [(o.segment_id, o.text) for o in out] == [(1, "c d")]
    assert (policy.resume.segment_id, policy.resume.sample) == (0, round(0.8 * RATE))


def test_a_cut_in_a_pause_resumes_from_the_end_of_what_was_received() -> None:
    """No speech going on at the cut: every word is final and nothing needs to be heard again."""
    policy = UtterancePolicy(pad_s=0.2, hold_s=0)
    policy.feed(np.zeros(RATE, dtype=np.float32), [SpeechEvent("start", RATE // 2)])
    policy.feed(np.zeros(2 * RATE, dtype=np.float32), [SpeechEvent("end", RATE + RATE // 2)])
    window = policy.next_window(now=0.0)
    assert window is not None and window.kind == "final"
    out = policy.accept(window, result(("hello", 0.3, 0.6), ("there", 0.7, 1.0)))
    policy.cut(policy.received)
    assert policy.next_window(now=0.0, finalize_until=policy.received) is None
    assert [(o.segment_id, o.text) for o in out] == [(0, "hello there")]
    assert (policy.resume.segment_id, policy.resume.sample) == (1, 3 * RATE)
