"""Wire messages: parsing client frames, validating config, serialising server messages."""

from __future__ import annotations

import json

import pytest

from real_time_audio.messages import (
    ConfigUpdate,
    EndMessage,
    FlushMessage,
    KeepaliveMessage,
    ProtocolError,
    SessionConfig,
    Transcription,
    WordTiming,
    apply_config,
    parse_client_text,
    to_json,
)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("END", EndMessage),
        (" END\n", EndMessage),
        ('{"type": "end"}', EndMessage),
        ('{"type": "flush"}', FlushMessage),
        ('{"type": "keepalive"}', KeepaliveMessage),
        ('{"type": "config", "language": "de"}', ConfigUpdate),
    ],
)
def test_client_messages_parse(text: str, kind: type) -> None:
    """Every client message of the protocol is recognised."""
    assert isinstance(parse_client_text(text), kind)


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("hello", "bad_message", "text frames must be JSON objects"),
        ("[1, 2]", "bad_message", "text frames must be JSON objects"),
        ('{"type": "dance"}', "bad_message", "unknown message type 'dance'"),
        ('{"kind": "flush"}', "bad_message", "unknown message type None"),
        ('{"type": "flush", "now": true}', "bad_message", "now: unknown field"),
        ('{"type": "config", "colour": "red"}', "bad_config", "colour: unknown field"),
        ('{"type": "config", "interim_results": "maybe"}', "bad_config", "interim_results"),
    ],
)
def test_bad_client_messages(text: str, code: str, fragment: str) -> None:
    """Unparsable or unknown frames get the protocol's error code and a message naming the problem."""
    with pytest.raises(ProtocolError) as info:
        parse_client_text(text)
    assert info.value.code == code
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("update", "fragment"),
    [
        ({"sample_rate": 7999}, "sample_rate: Input should be greater than or equal to 8000"),
        ({"sample_rate": 48001}, "sample_rate: Input should be less than or equal to 48000"),
        ({"channels": 3}, "channels: Input should be 1 or 2"),
        ({"task": "summarise"}, "task: Input should be 'transcribe' or 'translate'"),
        ({"encoding": "aiff"}, "encoding: Input should be"),
        ({"language": "english"}, "language: must be an ISO language code"),
        ({"volume": 3}, "unknown config field(s): volume"),
    ],
)
def test_invalid_config_names_the_field(update: dict[str, object], fragment: str) -> None:
    """Config errors are `bad_config` and name the offending field."""
    with pytest.raises(ProtocolError) as info:
        apply_config(SessionConfig(), update)
    assert info.value.code == "bad_config"
    assert fragment in info.value.message


@pytest.mark.parametrize("encoding", ["pcm_s16le", "pcm_f32le", "webm", "ogg", "mp4", "wav", "mp3", "flac"])
def test_every_protocol_encoding_is_accepted(encoding: str) -> None:
    assert apply_config(SessionConfig(), {"encoding": encoding}).encoding == encoding


def test_config_update_keeps_unset_fields() -> None:
    """A config message changes only the fields it names."""
    config = apply_config(SessionConfig(), {"sample_rate": 44100, "channels": 2})
    config = apply_config(config, {"language": "FR", "interim_results": False})
    assert config.wire() == {
        "encoding": "pcm_s16le",
        "sample_rate": 44100,
        "channels": 2,
        "chunk_samples": 4096,
        "language": "fr",
        "task": "transcribe",
        "interim_results": False,
    }


def test_echoed_server_config_is_accepted() -> None:
    """A client may send back the config the server announced, chunk_samples included."""
    announced = SessionConfig().wire() | {"sample_rate": 48000}
    assert apply_config(SessionConfig(), announced).sample_rate == 48000


def test_transcription_omits_words_when_unavailable() -> None:
    """`words` is left out rather than sent as null; when present it is a list of timings."""
    message = Transcription(segment_id=3, is_final=False, text="hi", start=1.0, end=2.0, language="en", lag=0.5)
    assert json.loads(to_json(message)) == {
        "type": "transcription",
        "segment_id": 3,
        "is_final": False,
        "text": "hi",
        "start": 1.0,
        "end": 2.0,
        "language": "en",
        "lag": 0.5,
    }
    message.words = [WordTiming(word="hi", start=1.1, end=1.4)]
    assert json.loads(to_json(message))["words"] == [{"word": "hi", "start": 1.1, "end": 1.4}]
