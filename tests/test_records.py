"""The session folder's layout and its readers, on folders written by hand."""

from __future__ import annotations

import json
from pathlib import Path

from real_time_audio.storage.layout import (
    audio_name,
    audio_path,
    is_session_id,
    new_session_id,
    read_metadata,
    read_transcript,
)


def test_session_ids() -> None:
    made = {new_session_id() for _ in range(50)}
    assert len(made) == 50 and all(is_session_id(i) for i in made)
    for bad in ("0123456789ABCDEF0123456789ABCDEF", "../etc", "0123", "0123456789abcdef0123456789abcdef0"):
        assert not is_session_id(bad)


def test_audio_names() -> None:
    assert [audio_name(e) for e in ("pcm_s16le", "pcm_f32le", "webm", "flac")] == [
        "audio.wav",
        "audio.wav",
        "audio.webm",
        "audio.flac",
    ]


def test_metadata_reader(tmp_path: Path) -> None:
    assert read_metadata(tmp_path / "missing") is None
    (tmp_path / "session.json").write_text("{not json")
    assert read_metadata(tmp_path) is None
    (tmp_path / "session.json").write_text("[1, 2]")
    assert read_metadata(tmp_path) is None
    (tmp_path / "session.json").write_text('{"status": "completed"}')
    assert read_metadata(tmp_path) == {"status": "completed"}


def test_transcript_reader_skips_a_line_cut_short(tmp_path: Path) -> None:
    assert read_transcript(tmp_path) == []
    lines = [json.dumps({"segment_id": 0, "text": "one"}), "", json.dumps({"segment_id": 1, "text": "two"}), '{"seg']
    (tmp_path / "transcript.jsonl").write_text("\n".join(lines))
    assert [f["text"] for f in read_transcript(tmp_path)] == ["one", "two"]


def test_only_the_recorders_audio_names_are_served(tmp_path: Path) -> None:
    (tmp_path / "audio.ogg").write_bytes(b"OggS")
    (tmp_path / "session.json").write_text("{}")
    assert audio_path(tmp_path, {"audio_file": "audio.ogg"}) == tmp_path / "audio.ogg"
    assert audio_path(tmp_path, {"audio_file": "audio.webm"}) is None  # named, but not on disk
    for name in ("session.json", "../audio.ogg", "/etc/passwd", None, 3):
        assert audio_path(tmp_path, {"audio_file": name}) is None
