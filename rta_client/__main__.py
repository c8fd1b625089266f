"""`python -m rta_client` (also installed as `rta-client`): see `--help`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rta_client.console import Console
from rta_client.formats import FORMATS, SUFFIX_FORMAT, render
from rta_client.session import DEFAULT_URI, ClientError, ClientOptions, SessionResult

ENCODINGS = ("auto", "pcm_s16le", "pcm_f32le", "webm", "ogg", "mp4", "mp3", "flac", "wav")


def _connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", default=os.environ.get("TRANSCRIBE_URI", DEFAULT_URI), help="server WebSocket URL")
    parser.add_argument(
        "--token", default=os.environ.get("TRANSCRIBE_TOKEN"), help="API token, if the server needs one"
    )
    parser.add_argument("--language", help="ISO code such as en; omit to detect")
    parser.add_argument("--task", choices=("transcribe", "translate"), default=None)
    parser.add_argument("--prompt", help="domain words or context for the model")
    parser.add_argument("--no-interim", action="store_true", help="ask for finals only")


def _reconnect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reconnect",
        action="store_true",
        help="go on in a new session when the server restarts, is full or the connection drops, "
        "resending the audio from where the server stopped (sent as raw PCM)",
    )
    parser.add_argument(
        "--reconnect-timeout", type=float, default=60.0, help="seconds to keep trying to reconnect (default 60)"
    )


def _output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, help="write the transcript to this file")
    parser.add_argument("--format", "-f", choices=FORMATS, help="transcript format (default: from --output's suffix)")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing while running")


def _file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoding", choices=ENCODINGS, default="auto", help="default: from the file")
    parser.add_argument("--sample-rate", type=int, help="raw PCM only (default 16000)")
    parser.add_argument("--channels", type=int, choices=(1, 2), help="raw PCM only (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rta-client", description="Clients for the live transcription server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stream = commands.add_parser("stream", help="stream an audio file to the server")
    stream.add_argument("file", type=Path)
    _file_arguments(stream)
    stream.add_argument("--chunk-size", type=int, default=8192, help="bytes per WebSocket frame (default 8192)")
    stream.add_argument("--realtime", action="store_true", help="pace the audio like a live speaker")
    _reconnect_arguments(stream)
    _connection_arguments(stream)
    _output_arguments(stream)

    mic = commands.add_parser("mic", help="transcribe the microphone (type start, stop, resume, quit)")
    _connection_arguments(mic)
    _reconnect_arguments(mic)
    _output_arguments(mic)

    load = commands.add_parser("load", help="run many clients at once and report each one")
    load.add_argument("files", type=Path, nargs="*", help="audio files (default: sentences spoken by espeak-ng)")
    load.add_argument("--clients", "-n", type=int, default=8)
    load.add_argument("--chunk-size", type=int, default=8192)
    load.add_argument("--realtime", action="store_true", help="pace each client like a live speaker")
    _connection_arguments(load)

    stt = commands.add_parser("stt", help="transcribe a file offline with the server's engine (no server)")
    stt.add_argument("file", type=Path)
    _file_arguments(stt)
    stt.add_argument("--language", help="ISO code such as en; omit to detect")
    stt.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    _output_arguments(stt)

    tts = commands.add_parser("tts", help="synthesize speech offline with espeak-ng (makes test audio)")
    tts.add_argument("text")
    tts.add_argument("--output", "-o", type=Path, required=True, help=".wav, .flac, .mp3, .ogg, .webm, .mp4 or .raw")
    tts.add_argument("--voice", default="en", help="espeak-ng voice (default en)")
    tts.add_argument("--speed", type=int, default=165, help="words per minute")
    return parser


def _options(args: argparse.Namespace) -> ClientOptions:
    return ClientOptions(
        uri=args.uri,
        token=args.token,
        encoding=getattr(args, "encoding", "pcm_s16le"),
        sample_rate=getattr(args, "sample_rate", None),
        channels=getattr(args, "channels", None),
        language=args.language,
        task=args.task,
        prompt=args.prompt,
        interim_results=not args.no_interim,
    )


def _console(args: argparse.Namespace) -> Console:
    """Finals go to stdout, unless stdout is for the formatted transcript (--format without --output)."""
    if args.format and not args.output:
        return Console(out=sys.stderr, quiet=args.quiet)
    return Console(quiet=args.quiet)


def _write_transcript(args: argparse.Namespace, finals: list[dict[str, object]], completed: object) -> None:
    fmt = args.format or (SUFFIX_FORMAT.get(args.output.suffix.lower(), "text") if args.output else None)
    if args.output:
        args.output.write_text(render(finals, fmt or "text", completed), encoding="utf-8")  # type: ignore[arg-type]
    elif fmt:
        sys.stdout.write(render(finals, fmt, completed))  # type: ignore[arg-type]


def _finish_session(args: argparse.Namespace, result: SessionResult | None, console: Console) -> int:
    if result is None:
        return 0
    _write_transcript(args, result.finals, result.completed)  # type: ignore[arg-type]
    problems = result.problems()
    for problem in problems:
        console.problem(problem)
    if result.completed and not args.quiet:
        recording = result.completed["recording"]
        check = "matches" if result.sha256_ok else "DOES NOT match"
        console.note(
            f"completed: {result.completed['duration']:.2f} s of audio, {result.completed['segments']} segments; "
            f"recording sha256 {check} the {result.sent_bytes} bytes sent"
            + (f" ({recording['audio']})" if recording.get("audio") else "")
        )
    return 1 if problems else 0


async def _run(args: argparse.Namespace) -> int:
    if args.command == "stream":
        from rta_client.stream import stream_file

        console = _console(args)
        result = await stream_file(
            args.file,
            _options(args),
            chunk_size=args.chunk_size,
            realtime=args.realtime,
            console=console,
            reconnect=args.reconnect,
            reconnect_timeout_s=args.reconnect_timeout,
        )
        return _finish_session(args, result, console)
    if args.command == "mic":
        from rta_client.mic import run_microphone, stdin_commands

        console = _console(args)
        timeout = args.reconnect_timeout if args.reconnect else None
        heard = await run_microphone(_options(args), stdin_commands(), console=console, reconnect_timeout_s=timeout)
        return _finish_session(args, heard, console)
    if args.command == "load":
        from rta_client.load import load_command

        options = _options(args)
        return await load_command(args.files, args.clients, options, args.chunk_size, args.realtime, sys.stdout)
    raise AssertionError(args.command)


def _offline(args: argparse.Namespace) -> int:
    from rta_client import offline

    if args.command == "tts":
        from real_time_audio.audio.files import write_audio

        samples, rate = offline.synthesize(args.text, args.voice, args.speed)
        try:
            written = write_audio(args.output, samples, rate)
        except ValueError as exc:
            raise ClientError(str(exc), 2) from None
        print(f"wrote {len(samples) / rate:.2f} s of speech to {args.output} ({written})", file=sys.stderr)
        return 0
    from real_time_audio.config import SettingsError, load_settings

    try:
        settings = load_settings(warmup=False)
    except SettingsError as exc:
        raise ClientError(str(exc), 2) from None
    encoding = None if args.encoding == "auto" else args.encoding
    samples = offline.read_for_stt(args.file, encoding, args.sample_rate or 16000, args.channels or 1)
    finals = offline.transcribe_offline(samples, settings, args.language, args.task)
    console = _console(args)
    if not args.output and not args.format:
        for final in finals:
            console.on_message(final)
    _write_transcript(args, finals, None)  # type: ignore[arg-type]
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("stt", "tts"):
            return _offline(args)
        return asyncio.run(_run(args))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
