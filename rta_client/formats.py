"""Writing a finished transcript as plain text, SRT, WebVTT or JSON."""

from __future__ import annotations

import json
from typing import Any

from real_time_audio.api.transcripts import CUE_FORMATS, Cue, plain_text, render_cues

FORMATS = ("text", "srt", "vtt", "json")
SUFFIX_FORMAT = {".txt": "text", ".srt": "srt", ".vtt": "vtt", ".json": "json"}


def render(finals: list[dict[str, Any]], fmt: str, completed: dict[str, Any] | None = None) -> str:
    """The transcript made of `finals` (the server's final transcription messages) in `fmt`."""
    cues = [f for f in sorted(finals, key=lambda m: m["segment_id"]) if f["text"].strip()]
    if fmt in CUE_FORMATS:
        return render_cues([Cue(c["start"], c["end"], c["text"]) for c in cues], fmt)
    if fmt == "json":
        document = {
            "text": plain_text([Cue(c["start"], c["end"], c["text"]) for c in cues]),
            "segments": [
                {key: c[key] for key in ("segment_id", "start", "end", "text", "language", "words") if key in c}
                for c in cues
            ],
            "session": completed,
        }
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    raise ValueError(f"unknown transcript format {fmt!r}; choose one of {', '.join(FORMATS)}")
