// AudioWorklet processor: microphone samples -> 16 kHz mono 16-bit PCM, posted in blocks.
// The AudioContext is asked for 16 kHz; when the browser runs at another rate, the samples are
// resampled here by linear interpolation (good enough for speech going to Whisper).
const TARGET_RATE = 16000;
const BLOCK = 4096; // samples per posted block: 256 ms

class PcmWriter extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE;
    this.position = 0; // fractional read position into the incoming samples
    this.previous = 0; // the last sample of the previous buffer
    this.block = new Int16Array(BLOCK);
    this.filled = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush" && this.filled > 0) this.post();
    };
  }

  post() {
    this.port.postMessage(this.block.slice(0, this.filled).buffer);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const length = channels[0].length;
    const mono = new Float32Array(length);
    for (const channel of channels) for (let i = 0; i < length; i++) mono[i] += channel[i] / channels.length;
    // `position` counts from this buffer's first sample; -1 is the previous buffer's last one.
    while (this.position <= length - 1) {
      const index = Math.floor(this.position);
      const fraction = this.position - index;
      const a = index < 0 ? this.previous : mono[index];
      const sample = fraction === 0 ? a : a + (mono[index + 1] - a) * fraction;
      const clipped = Math.max(-1, Math.min(1, sample));
      this.block[this.filled++] = clipped < 0 ? clipped * 0x8000 : clipped * 0x7fff;
      if (this.filled === BLOCK) this.post();
      this.position += this.step;
    }
    this.position -= length;
    this.previous = mono[length - 1];
    return true;
  }
}

registerProcessor("pcm-writer", PcmWriter);
