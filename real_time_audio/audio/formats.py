"""Which audio format a stream or file is: the one place that knows the containers' signatures.

A container is recognised by its first bytes (`check_magic`, `sniff_encoding`); a file may also be
named for its format (`SUFFIX_ENCODING`). Raw PCM has no header, so only its name can say what it is.
"""

from __future__ import annotations

from pathlib import Path, PurePath

# Container encoding → FFmpeg demuxer.
DEMUXERS = {"webm": "matroska", "ogg": "ogg", "mp4": "mp4", "mp3": "mp3", "flac": "flac", "wav": "wav"}

# File suffix → protocol encoding. Raw PCM has no header, so its suffix is the only clue.
SUFFIX_ENCODING = {
    ".webm": "webm",
    ".weba": "webm",
    ".mkv": "webm",
    ".ogg": "ogg",
    ".oga": "ogg",
    ".opus": "ogg",
    ".mp4": "mp4",
    ".m4a": "mp4",
    ".mp3": "mp3",
    ".flac": "flac",
    ".wav": "wav",
    ".raw": "pcm_s16le",
    ".pcm": "pcm_s16le",
    ".s16": "pcm_s16le",
    ".f32": "pcm_f32le",
}


def check_magic(encoding: str, head: bytes) -> str | None:
    """Why `head` (the first bytes of a stream) cannot start a file of `encoding`, or None if it can."""
    if encoding == "webm":
        ok = head.startswith(b"\x1a\x45\xdf\xa3")
        expected = "an EBML header (1A 45 DF A3)"
    elif encoding == "ogg":
        ok = head.startswith(b"OggS")
        expected = "an Ogg page ('OggS')"
    elif encoding == "mp4":
        ok = len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"styp", b"free", b"skip", b"wide", b"mdat")
        expected = "an MP4 box such as 'ftyp'"
    elif encoding == "flac":
        ok = head.startswith((b"fLaC", b"ID3"))
        expected = "a FLAC signature ('fLaC')"
    elif encoding == "wav":
        ok = head.startswith((b"RIFF", b"RF64")) and head[8:12] == b"WAVE"
        expected = "a RIFF/WAVE header"
    elif encoding == "mp3":
        ok = head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
        expected = "an ID3 tag or an MPEG audio frame sync"
    else:
        raise ValueError(f"not a container encoding: {encoding}")
    if ok:
        return None
    return f"the stream does not look like {encoding}: it should start with {expected}, got {head[:8].hex(' ')}"


def encoding_for(path: Path) -> str:
    """The protocol encoding of an audio file, from its suffix or, failing that, its first bytes."""
    encoding = SUFFIX_ENCODING.get(path.suffix.lower())
    if encoding:
        return encoding
    with path.open("rb") as handle:
        encoding = sniff_encoding(handle.read(64))
    if encoding:
        return encoding
    raise ValueError(f"{path}: unknown audio format; name it .wav, .webm, .ogg, .mp4, .mp3, .flac or .raw")


def sniff_encoding(head: bytes) -> str | None:
    """The container encoding whose signature `head` (a file's first bytes) starts with, or None."""
    return next((candidate for candidate in DEMUXERS if check_magic(candidate, head) is None), None)


def guess_encoding(filename: str | None, head: bytes) -> str | None:
    """An uploaded file's encoding: its name's, unless its first bytes say otherwise (a wrong name
    loses to a recognised signature); None when neither is recognised."""
    encoding = SUFFIX_ENCODING.get(PurePath(filename or "").suffix.lower())
    if encoding is None or encoding not in DEMUXERS or check_magic(encoding, head) is not None:
        encoding = sniff_encoding(head) or encoding
    return encoding
