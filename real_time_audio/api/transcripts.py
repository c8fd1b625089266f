"""A finished transcript as plain text, SubRip (SRT) or WebVTT subtitles.

Shared by POST /v1/audio/transcriptions and the command-line clients. A cue is one final
transcription: where it starts and ends (seconds of audio) and its text; cues without text are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CUE_FORMATS = ("text", "srt", "vtt")


@dataclass(slots=True, frozen=True)
class Cue:
    start: float
    end: float
    text: str


def timestamp(seconds: float, separator: str) -> str:
    """HH:MM:SS plus milliseconds after `separator` ("," for SRT, "." for WebVTT)."""
    millis = round(max(0.0, seconds) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def plain_text(cues: Sequence[Cue]) -> str:
    """The cues' texts joined by single spaces, without a final newline."""
    return " ".join(text for cue in cues if (text := cue.text.strip()))


def render_cues(cues: Sequence[Cue], fmt: str) -> str:
    """The transcript as a file: `text` (one line), `srt` or `vtt`."""
    spoken = [cue for cue in cues if cue.text.strip()]
    if fmt == "text":
        return plain_text(spoken) + "\n"
    if fmt == "srt":
        return "\n".join(
            f"{index}\n{timestamp(c.start, ',')} --> {timestamp(c.end, ',')}\n{c.text.strip()}\n"
            for index, c in enumerate(spoken, start=1)
        )
    if fmt == "vtt":
        blocks = [f"{timestamp(c.start, '.')} --> {timestamp(c.end, '.')}\n{c.text.strip()}\n" for c in spoken]
        return "WEBVTT\n\n" + "\n".join(blocks)
    raise ValueError(f"unknown transcript format {fmt!r}; choose one of {', '.join(CUE_FORMATS)}")
