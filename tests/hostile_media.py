"""Hand-made hostile audio: tiny files that declare or expand to enormous amounts of audio.

Each is a valid stream of its format (the decoders accept it), written byte by byte here so that
the tests need no encoder that would refuse to make such a thing:
- `flac_bomb`: FLAC frames of 65,535 samples whose one subframe is a constant (13 bytes a frame);
- `opus_bomb`: Ogg Opus pages of 255 two-byte packets, each six empty 20 ms frames (120 ms of
  concealment audio from 2 bytes);
- `mulaw_wav`: a µ-law WAV that declares a sample rate of 1 Hz (resampled up, each byte becomes
  16,000 samples);
- `remux`: the same packets in another container (the FLAC bomb in MP4, Matroska or Ogg).
"""

from __future__ import annotations

import io
import struct

import av


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _utf8_number(value: int) -> bytes:
    """FLAC's frame number coding (UTF-8 extended to 31 bits)."""
    if value < 0x80:
        return bytes([value])
    for length, first_mark in ((2, 0xC0), (3, 0xE0), (4, 0xF0), (5, 0xF8), (6, 0xFC)):
        if value < 1 << (5 * length + 1):
            tail = [0x80 | (value >> (6 * index) & 0x3F) for index in range(length - 2, -1, -1)]
            return bytes([first_mark | (value >> (6 * (length - 1))), *tail])
    raise ValueError(value)


def flac_bomb(frames: int, value: int = 0, block: int = 65535) -> bytes:
    """8 kHz mono 8-bit FLAC: `frames` frames of `block` samples, each sample `value`.

    `frames` × 13 bytes hold `frames` × 8.2 s of audio.
    """
    rate, channels, bits = 8000, 1, 8
    packed = (rate << 44) | ((channels - 1) << 41) | ((bits - 1) << 36)  # total samples: unknown
    streaminfo = struct.pack(">HH", block, block) + bytes(6) + packed.to_bytes(8, "big") + bytes(16)
    out = [b"fLaC", bytes([0x80]), len(streaminfo).to_bytes(3, "big"), streaminfo]
    for number in range(frames):
        # Sync + fixed block size; block size from the end of the header, 8 kHz; mono, 8 bits.
        header = bytearray([0xFF, 0xF8, 0x74, 0x02]) + _utf8_number(number) + (block - 1).to_bytes(2, "big")
        header.append(_crc8(bytes(header)))
        frame = bytes(header) + bytes([0x00, value & 0xFF])  # a CONSTANT subframe and its value
        out.append(frame + _crc16(frame).to_bytes(2, "big"))
    return b"".join(out)


_OGG_CRC = [0] * 256
for _index in range(256):
    _crc = _index << 24
    for _ in range(8):
        _crc = ((_crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if _crc & 0x80000000 else (_crc << 1) & 0xFFFFFFFF
    _OGG_CRC[_index] = _crc


def _ogg_page(packets: list[bytes], granule: int, sequence: int, flags: int = 0, serial: int = 0x5EED) -> bytes:
    lacing = bytearray()
    for packet in packets:
        lacing += b"\xff" * (len(packet) // 255) + bytes([len(packet) % 255])
    header = b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, serial, sequence, 0, len(lacing)) + lacing
    page = bytearray(header + b"".join(packets))
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[((crc >> 24) & 0xFF) ^ byte]
    page[22:26] = struct.pack("<I", crc)
    return bytes(page)


def opus_bomb(pages: int) -> bytes:
    """Ogg Opus whose packets are two bytes each: six empty 20 ms CELT frames (120 ms of audio).

    A page of 255 such packets, 792 bytes, holds 30.6 s of audio.
    """
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, 48000, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 4) + b"bomb" + struct.pack("<I", 0)
    out = [_ogg_page([head], 0, 0, flags=0x02), _ogg_page([tags], 0, 1)]
    packet = bytes([(31 << 3) | 3, 6])  # config 31 (CELT FB 20 ms), code 3; CBR, 6 frames, no data
    granule = 0
    for number in range(pages):
        granule += 255 * 5760
        out.append(_ogg_page([packet] * 255, granule, 2 + number))
    return b"".join(out)


def mulaw_wav(data_bytes: int, rate: int = 1) -> bytes:
    """A µ-law WAV declaring `rate` Hz, with `data_bytes` samples of silence."""
    fmt = struct.pack("<HHIIHH", 7, 1, rate, rate, 1, 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", data_bytes)
    body += b"\xff" * data_bytes  # µ-law 0xFF is zero
    return b"RIFF" + struct.pack("<I", len(body)) + body


def remux(data: bytes, source_format: str, target_format: str, options: dict[str, str] | None = None) -> bytes:
    """The same packets in another container (no decoding, no encoding)."""
    out = io.BytesIO()
    with (
        av.open(io.BytesIO(data), format=source_format) as source,
        av.open(out, "w", format=target_format, options=options or {}) as target,
    ):
        stream = source.streams.audio[0]
        copy = target.add_stream_from_template(stream)
        for packet in source.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = copy
            target.mux(packet)
    return out.getvalue()


def flood_without_reading(port: int, path: str, headers: dict[str, str], limit: int, stall_s: float = 3.0) -> int:
    """A WebSocket client that sends binary frames of 64 KiB and never reads what comes back.

    Unlike a client library (which keeps reading into its own buffers), this leaves the server's
    replies in the socket. Returns the bytes sent before a send stalled for `stall_s` (or `limit`).
    """
    import socket

    sock = socket.create_connection(("127.0.0.1", port))
    try:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{head}\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:  # the handshake's answer is the only thing ever read
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            response += chunk
        if not response.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(response.decode(errors="replace"))
        payload = b"\x01" * 65536
        frame = bytes([0x82, 0xFF]) + len(payload).to_bytes(8, "big") + b"\x00\x00\x00\x00" + payload
        sock.settimeout(stall_s)
        sent = 0
        while sent < limit:
            try:
                sock.sendall(frame)
            except (TimeoutError, OSError):
                break
            sent += len(payload)
        return sent
    finally:
        sock.close()


# The decompression bombs the tests and bench/hostile.py send, by the protocol encoding they claim.
BOMBS = {
    "flac": lambda: flac_bomb(400),  # 5.2 KB declaring 55 minutes
    "ogg": lambda: opus_bomb(20),  # 16 KB of Opus declaring 10 minutes
    # Fragmented, as a browser's live MP4 is: decoded as it arrives.
    "mp4": lambda: remux(flac_bomb(400), "flac", "mp4", {"movflags": "frag_keyframe+empty_moov+default_base_moof"}),
    "webm": lambda: remux(flac_bomb(400), "flac", "matroska"),
}
