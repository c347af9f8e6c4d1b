#!/usr/bin/env bash
# Synthesise the example recordings in examples/ with espeak-ng (no corpus audio is committed).
#
#   bash scripts/ops/make_examples.sh [OUT_DIR] [VOICE] [SPEED_WPM]     (defaults: examples en-us+klatt 130)
#
# Each sentence uses the shipped model's vocabulary (AN4: spelled letters, numbers,
# commands). espeak-ng writes 22.05 kHz WAV; it is resampled to 16 kHz mono 16-bit with
# torchaudio and written beside a .txt reference (upper case, as AN4's transcripts).
# Needs espeak-ng (Debian package `espeak-ng`) and the project's venv (python with torchaudio).
set -euo pipefail
out=${1:-examples}
voice=${2:-en-us+klatt}
speed=${3:-130}
mkdir -p "$out"
sentences=(
  "yes"
  "stop"
  "enter one two three"
  "erase c q"
  "rubout"
  "five six seven eight"
  "go"
  "no"
)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in "${!sentences[@]}"; do
  text=${sentences[$i]}
  name=$(printf 'ex%02d_%s' "$((i + 1))" "$(echo "$text" | tr ' ' '_')")
  espeak-ng -v "$voice" -s "$speed" -w "$tmp/$name.wav" "$text"
  echo "$text" | tr '[:lower:]' '[:upper:]' > "$out/$name.txt"
done
python - "$tmp" "$out" <<'PY'
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as F

PAD_SAMPLES = 8000  # 0.5 s of silence before and after: without it the model missed most words
GAIN = 0.5  # espeak-ng peaks near full scale

for src in sorted(Path(sys.argv[1]).glob("*.wav")):
    samples, rate = sf.read(str(src), dtype="float32", always_2d=True)
    mono = torch.from_numpy(samples.mean(axis=1))
    resampled = F.resample(mono, rate, 16000).numpy() * GAIN
    silence = np.zeros(PAD_SAMPLES, dtype=np.float32)
    sf.write(str(Path(sys.argv[2]) / src.name), np.concatenate([silence, resampled, silence]).clip(-1, 1), 16000, subtype="PCM_16")
PY
echo "wrote ${#sentences[@]} recordings and references to $out/ (espeak-ng -v $voice -s $speed)"
