// The microphone's AudioWorklet (loaded by app.js): mono Float32 chunks at the server's input rate.
//
//   await ctx.audioWorklet.addModule("static/pcm-worklet.js");
//   const node = new AudioWorkletNode(ctx, "pcm-capture", {processorOptions: {targetRate: 24000, chunkSamples: 960}});
//   node.port.onmessage = (e) => send(e.data);  // a Float32Array of chunkSamples samples (40 ms at 24 kHz)
//
// The page asks for a 24 kHz AudioContext, so usually no resampling happens here; a browser that refuses that
// rate gets linear interpolation from the context's own rate (speech has little energy above 12 kHz).
"use strict";

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.step = sampleRate / (o.targetRate || 24000);  // input samples per output sample
    this.size = o.chunkSamples || 960;
    this.chunk = new Float32Array(this.size);
    this.fill = 0;
    this.pos = 0;  // the next output sample's position in the current block; -1 is the previous block's last
    this.prev = 0;
  }

  push(v) {
    this.chunk[this.fill++] = v;
    if (this.fill === this.size) {
      const out = this.chunk;
      this.port.postMessage(out, [out.buffer]);  // transferred (detached here): a fresh buffer for the next chunk
      this.chunk = new Float32Array(this.size);
      this.fill = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || input[0].length === 0) return true;  // no source connected yet
    let x = input[0];
    if (input.length > 1) {  // a stereo device: its average
      x = new Float32Array(x.length);
      for (const ch of input) for (let i = 0; i < x.length; i++) x[i] += ch[i] / input.length;
    }
    const n = x.length;
    if (this.step === 1) {
      for (let i = 0; i < n; i++) this.push(x[i]);
      return true;
    }
    while (this.pos < n - 1) {
      const i = Math.floor(this.pos), frac = this.pos - i;
      const a = i < 0 ? this.prev : x[i];
      this.push(a + (x[i + 1] - a) * frac);
      this.pos += this.step;
    }
    this.pos -= n;
    this.prev = x[n - 1];
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
