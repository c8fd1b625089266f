"""Writing a finished transcript as plain text, SRT, WebVTT or JSON."""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("text", "srt", "vtt", "json")
SUFFIX_FORMAT = {".txt": "text", ".srt": "srt", ".vtt": "vtt", ".json": "json"}


def _clock(seconds: float, separator: str) -> str:
    millis = round(max(0.0, seconds) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def render(finals: list[dict[str, Any]], fmt: str, completed: dict[str, Any] | None = None) -> str:
    """The transcript made of `finals` (the server's final transcription messages) in `fmt`."""
    cues = [f for f in sorted(finals, key=lambda m: m["segment_id"]) if f["text"].strip()]
    if fmt == "text":
        return " ".join(c["text"].strip() for c in cues) + "\n"
    if fmt == "srt":
        blocks = [
            f"{index}\n{_clock(c['start'], ',')} --> {_clock(c['end'], ',')}\n{c['text'].strip()}\n"
            for index, c in enumerate(cues, start=1)
        ]
        return "\n".join(blocks)
    if fmt == "vtt":
        blocks = [f"{_clock(c['start'], '.')} --> {_clock(c['end'], '.')}\n{c['text'].strip()}\n" for c in cues]
        return "WEBVTT\n\n" + "\n".join(blocks)
    if fmt == "json":
        document = {
            "text": " ".join(c["text"].strip() for c in cues),
            "segments": [
                {key: c[key] for key in ("segment_id", "start", "end", "text", "language", "words") if key in c}
                for c in cues
            ],
            "session": completed,
        }
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    raise ValueError(f"unknown transcript format {fmt!r}; choose one of {', '.join(FORMATS)}")
