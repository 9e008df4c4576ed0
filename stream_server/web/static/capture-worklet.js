// AudioWorklet: microphone samples → 16 kHz mono pcm16 frames of `frameMs` for /v1/stream.
// The page runs its AudioContext at 16 kHz where the browser allows (the browser then resamples
// the microphone itself); otherwise this resamples from the context's rate, averaging the input
// over each output sample's span (a box filter against aliasing) before taking it.

const TARGET_RATE = 16000;

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.frameSamples = Math.round((TARGET_RATE * (opts.frameMs || 40)) / 1000);
    this.ratio = sampleRate / TARGET_RATE; // input samples per output sample
    this.frame = new Int16Array(this.frameSamples);
    this.filled = 0;
    this.acc = 0; // running sum of the input over the current output sample's span
    this.accN = 0;
    this.pos = 0; // input samples consumed towards the next output sample
    this.peak = 0;
    this.sumSquares = 0;
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data === "stop") this.running = false;
    };
  }

  push(value) {
    const s = Math.max(-1, Math.min(1, value));
    this.frame[this.filled++] = s < 0 ? Math.round(s * 0x8000) : Math.round(s * 0x7fff);
    this.peak = Math.max(this.peak, Math.abs(s));
    this.sumSquares += s * s;
    if (this.filled === this.frameSamples) {
      const rms = Math.sqrt(this.sumSquares / this.frameSamples);
      this.port.postMessage({ pcm: this.frame.buffer, rms, peak: this.peak }, [this.frame.buffer]);
      this.frame = new Int16Array(this.frameSamples);
      this.filled = 0;
      this.peak = 0;
      this.sumSquares = 0;
    }
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const channel = input[0];
    if (this.ratio === 1) {
      for (let i = 0; i < channel.length; i++) this.push(channel[i]);
      return true;
    }
    for (let i = 0; i < channel.length; i++) {
      this.acc += channel[i];
      this.accN += 1;
      this.pos += 1;
      if (this.pos >= this.ratio) {
        this.push(this.acc / this.accN);
        this.pos -= this.ratio;
        this.acc = 0;
        this.accN = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
