// The realtime page (index.html): a voice conversation with the server over its /v1/realtime WebSocket.
//
//   python -m omni_jax.serve --checkpoint CKPT     then open http://127.0.0.1:8000/
//   query parameters (all optional): ?model=NAME (default: the first of GET /v1/models), ?voice=Chelsie,
//   ?max_output_tokens=16 (the reply budget), ?instructions=..., ?modality=text (text replies instead of speech)
//
// Microphone: a 24 kHz AudioContext and pcm-worklet.js post 40 ms Float32 chunks, sent as PCM16 LE in
// input_audio_buffer.append; the server's VAD decides where a turn ends and answers. Camera (when on): a JPEG
// frame a second in input_image_buffer.append. Replies: response.output_audio.delta PCM16 24 kHz scheduled back to
// back on a 24 kHz playback context; the transcript grows from the transcript / text deltas. Latency per turn:
// from speech_stopped (the server's end-of-turn decision) to the first text and first audio delta.
// window.omniStats mirrors the state for tests (tests/test_realtime_page.py).
"use strict";

(() => {
  const RATE = 24000;  // the server's input rate we ask for, and its output rate
  const CHUNK = 960;  // 40 ms of input per append
  const FRAME_MS = 1000;  // a camera frame a second (the server takes at most 2)
  const FRAME_SIDE = 448;  // a frame's longer side, px: the server's image budget is far below a camera's
  const STATIC_BASE = new URL(".", document.currentScript.src).href;
  const params = new URLSearchParams(location.search);
  const $ = (id) => document.getElementById(id);

  const stats = {
    connected: false, sessionCreated: false, transcript: "", audioDeltas: 0, playedSamples: 0, turns: [],
    lastError: null, firstTextMs: null, firstAudioMs: null,
    model: null, status: "starting", audioChunksSent: 0, imagesSent: 0, events: {}, eventLog: [],
    audio: {mic: null, micRate: null, playback: null},  // the audio contexts (diagnostics)
  };
  window.omniStats = stats;

  let ws = null, micCtx = null, micStream = null, camStream = null, camTimer = null, playCtx = null;
  let playhead = 0, eventSeq = 0, activeResponse = null, errorUntil = 0;
  const playing = new Set();  // scheduled AudioBufferSourceNodes: {src, at, n, turn, stopped, stoppedAt}
  const muted = new Set();  // response ids whose remaining audio is dropped (interrupted locally)
  const byItem = new Map(), byResponse = new Map(), views = new Map();  // turn lookups; turn -> its DOM nodes

  // ------------------------------------------------------------------------------------------------------
  // Status, log and latency table.

  function setStatus(kind, text) {
    if (kind !== "error" && performance.now() < errorUntil) return;  // an error stays readable for a moment
    if (kind === "error") errorUntil = performance.now() + 4000;
    stats.status = text;
    const el = $("status");
    el.textContent = text;
    el.className = kind ? "st-" + kind : "";
  }

  function idleStatus() {
    if (!stats.connected) return;
    if (playing.size) setStatus("speaking", "speaking");
    else if (activeResponse) setStatus("", "thinking");
    else setStatus("listening", "listening");
  }

  function fail(message) {
    stats.lastError = message;
    setStatus("error", "error: " + message);
    const div = document.createElement("div");
    div.className = "turn small";
    div.style.color = "#b02828";
    div.textContent = "error: " + message;
    appendLog(div);
  }

  function note(what, detail) {  // the last 40 events (deltas: the first of each kind) and sent frames, for tests
    stats.eventLog.push(detail === undefined ? [Math.round(performance.now()), what]
      : [Math.round(performance.now()), what, detail]);
    if (stats.eventLog.length > 40) stats.eventLog.shift();
  }

  function appendLog(node) {
    const log = $("log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.appendChild(node);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function newTurn(itemId) {
    const turn = {n: stats.turns.length + 1, itemId: itemId || null, responseId: null, speechMs: null, text: "",
                  audioDeltas: 0, audioSamples: 0, playedSamples: 0, firstTextMs: null, firstAudioMs: null,
                  status: "listening"};
    stats.turns.push(turn);
    if (itemId) byItem.set(itemId, turn);
    const box = document.createElement("div");
    box.className = "turn";
    const user = document.createElement("div");
    user.className = "user";
    const reply = document.createElement("div");
    reply.className = "assistant";
    box.append(user, reply);
    appendLog(box);
    const row = document.createElement("tr");
    $("latency").appendChild(row);
    views.set(turn, {user, reply, row, stoppedAt: null, audioStartMs: null});
    return turn;
  }

  function render(turn) {
    const v = views.get(turn);
    if (turn.itemId) {
      v.user.textContent = turn.speechMs === null ? "speaking\u2026"
        : `${(turn.speechMs / 1000).toFixed(1)} s of speech`;
    }
    const log = $("log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    v.reply.textContent = turn.text;
    v.reply.classList.toggle("cancelled", turn.status === "cancelled");
    if (atBottom) log.scrollTop = log.scrollHeight;
    const cells = [turn.n, turn.speechMs === null ? "" : (turn.speechMs / 1000).toFixed(1) + " s",
                   turn.firstTextMs === null ? "" : Math.round(turn.firstTextMs),
                   turn.firstAudioMs === null ? "" : Math.round(turn.firstAudioMs), turn.status];
    v.row.replaceChildren(...cells.map((c) => {
      const td = document.createElement("td");
      td.textContent = String(c);
      return td;
    }));
  }

  // ------------------------------------------------------------------------------------------------------
  // Base64 and PCM16.

  function bytesToBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  function base64ToBytes(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  function pcm16Base64(f32) {
    const out = new Uint8Array(f32.length * 2);
    const dv = new DataView(out.buffer);
    for (let i = 0; i < f32.length; i++) {
      const s = Math.max(-1, Math.min(1, f32[i]));
      dv.setInt16(2 * i, s < 0 ? s * 32768 : s * 32767, true);
    }
    return bytesToBase64(out);
  }

  // ------------------------------------------------------------------------------------------------------
  // The WebSocket.

  function send(event) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    event.event_id = "evt_page_" + (++eventSeq);
    ws.send(JSON.stringify(event));
    return true;
  }

  function sessionUpdate() {
    const output = {format: {type: "audio/pcm", rate: RATE}};
    if (params.get("voice")) output.voice = params.get("voice");
    const session = {
      type: "realtime", output_modalities: [params.get("modality") === "text" ? "text" : "audio"],
      audio: {
        input: {format: {type: "audio/pcm", rate: RATE},
                turn_detection: {type: "server_vad", threshold: 0.5, silence_duration_ms: 500, prefix_padding_ms: 300,
                                 create_response: true, interrupt_response: true}},
        output,
      },
    };
    const budget = parseInt(params.get("max_output_tokens") || "", 10);
    if (budget > 0) session.max_output_tokens = budget;
    if (params.get("instructions")) session.instructions = params.get("instructions");
    send({type: "session.update", session});
  }

  async function connect() {
    const key = $("apikey").value.trim();
    try { sessionStorage.setItem("omni_jax_api_key", key); } catch (e) { /* storage off: fine */ }
    setStatus("", "connecting");
    let model = params.get("model");
    if (!model) {
      const headers = key ? {Authorization: "Bearer " + key} : {};
      const r = await fetch(new URL("v1/models", location.href), {headers});
      if (r.status === 401) {
        fail("the server asks for an API key: enter it and press Connect");
        return;
      }
      if (!r.ok) throw new Error(`GET /v1/models: HTTP ${r.status}`);
      const body = await r.json();
      model = body.data && body.data.length ? body.data[0].id : null;
      if (!model) throw new Error("GET /v1/models lists no model");
    }
    stats.model = model;
    $("model").textContent = model;
    const url = new URL("v1/realtime?model=" + encodeURIComponent(model), location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    // Browsers cannot set an Authorization header on a WebSocket: the key rides in a subprotocol.
    const protocols = ["realtime"].concat(key ? ["openai-insecure-api-key." + key] : []);
    const sock = new WebSocket(url.href, protocols);
    ws = sock;
    sock.onopen = () => {
      if (ws !== sock) return;
      stats.connected = true;
      $("connect").textContent = "Disconnect";
      setStatus("", "connected");
      sessionUpdate();
    };
    sock.onmessage = (e) => {
      if (ws !== sock) return;
      let event;
      try {
        event = JSON.parse(e.data);
      } catch (err) {
        fail("the server sent a frame that is not JSON");
        return;
      }
      onEvent(event);
    };
    sock.onclose = (e) => {
      if (ws !== sock) return;
      ws = null;
      stats.connected = false;
      stats.sessionCreated = false;
      activeResponse = null;
      $("connect").textContent = "Connect";
      $("interrupt").disabled = true;
      const why = `disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`;
      if (e.code === 1000 || e.code === 1005) setStatus("", why);
      else fail(why);
    };
  }

  function disconnect() {
    if (ws) ws.close(1000, "closed by the page");
  }

  // ------------------------------------------------------------------------------------------------------
  // Server events.

  function turnOf(event) {
    return byResponse.get(event.response_id) || (activeResponse && byResponse.get(activeResponse)) || null;
  }

  function onEvent(event) {
    stats.events[event.type] = (stats.events[event.type] || 0) + 1;
    if (!event.type.endsWith(".delta") || stats.events[event.type] === 1) note(event.type, event.error);
    switch (event.type) {
      case "session.created":
        stats.sessionCreated = true;
        idleStatus();
        break;
      case "input_audio_buffer.speech_started": {
        if (playing.size) stopPlayback();  // barge-in: the user talks over the reply
        const turn = newTurn(event.item_id);
        views.get(turn).audioStartMs = event.audio_start_ms;
        turn.status = "speaking";
        render(turn);
        setStatus("user", "you are speaking");
        break;
      }
      case "input_audio_buffer.speech_stopped": {
        const turn = byItem.get(event.item_id) || newTurn(event.item_id);
        const v = views.get(turn);
        v.stoppedAt = performance.now();
        if (typeof event.audio_end_ms === "number" && typeof v.audioStartMs === "number") {
          turn.speechMs = Math.max(0, event.audio_end_ms - v.audioStartMs);
        }
        turn.status = "thinking";
        render(turn);
        setStatus("", "thinking");
        break;
      }
      case "response.created": {
        const id = event.response && event.response.id;
        // The reply belongs to the newest spoken turn that has none yet, else it is a turn of its own.
        let turn = null;
        for (let i = stats.turns.length - 1; i >= 0 && !turn; i--) {
          const t = stats.turns[i];
          if (!t.responseId && views.get(t).stoppedAt !== null) turn = t;
        }
        if (!turn) turn = newTurn(null);
        turn.responseId = id;
        turn.status = "responding";
        byResponse.set(id, turn);
        activeResponse = id;
        $("interrupt").disabled = false;
        render(turn);
        break;
      }
      case "response.output_audio_transcript.delta":
      case "response.output_text.delta":
      case "response.audio_transcript.delta":
      case "response.text.delta": {
        const turn = turnOf(event);
        if (!turn || typeof event.delta !== "string") break;
        if (turn.firstTextMs === null) {
          const t0 = views.get(turn).stoppedAt;
          if (t0 !== null) stats.firstTextMs = turn.firstTextMs = performance.now() - t0;
        }
        turn.text += event.delta;
        stats.transcript += event.delta;
        render(turn);
        break;
      }
      case "response.output_audio.delta":
      case "response.audio.delta": {
        stats.audioDeltas++;
        const turn = turnOf(event);
        if (!turn || typeof event.delta !== "string") break;
        turn.audioDeltas++;
        if (turn.firstAudioMs === null) {
          const t0 = views.get(turn).stoppedAt;
          if (t0 !== null) stats.firstAudioMs = turn.firstAudioMs = performance.now() - t0;
          render(turn);
        }
        if (!muted.has(turn.responseId)) play(event.delta, turn);
        break;
      }
      case "response.done": {
        const r = event.response || {};
        const turn = byResponse.get(r.id);
        if (turn) {
          turn.status = r.status || "completed";
          render(turn);
        }
        if (activeResponse === r.id) activeResponse = null;
        if (!activeResponse && !playing.size) $("interrupt").disabled = true;
        if (turn && stats.transcript && !stats.transcript.endsWith("\n")) stats.transcript += "\n";
        idleStatus();
        break;
      }
      case "error": {
        const e = event.error || {};
        fail(e.message || e.code || "unknown server error");
        break;
      }
      default:
        break;
    }
  }

  // ------------------------------------------------------------------------------------------------------
  // Playback: deltas scheduled back to back on a 24 kHz context, so consecutive ones join without a gap.

  function play(b64, turn) {
    const bytes = base64ToBytes(b64);
    const n = bytes.length >> 1;
    if (!n || !playCtx) return;
    const dv = new DataView(bytes.buffer, bytes.byteOffset, n * 2);
    const buf = playCtx.createBuffer(1, n, RATE);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < n; i++) ch[i] = dv.getInt16(2 * i, true) / 32768;
    const src = playCtx.createBufferSource();
    src.buffer = buf;
    src.connect(playCtx.destination);
    const now = playCtx.currentTime;
    if (playhead < now + 0.01) playhead = now + 0.05;  // nothing queued (or an underrun): a small lead
    const entry = {src, at: playhead, n, turn, stopped: false, stoppedAt: 0};
    src.start(entry.at);
    playhead += n / RATE;
    turn.audioSamples += n;
    playing.add(entry);
    src.onended = () => {
      playing.delete(entry);
      const done = entry.stopped ? Math.round((entry.stoppedAt - entry.at) * RATE) : n;
      const played = Math.max(0, Math.min(n, done));
      stats.playedSamples += played;
      entry.turn.playedSamples += played;
      if (!playing.size) {
        if (!activeResponse) $("interrupt").disabled = true;
        idleStatus();
      }
    };
    setStatus("speaking", "speaking");
  }

  function stopPlayback() {
    if (activeResponse) muted.add(activeResponse);
    const now = playCtx ? playCtx.currentTime : 0;
    for (const entry of playing) {
      entry.stopped = true;
      entry.stoppedAt = now;
      try { entry.src.stop(); } catch (e) { /* not started yet: stop() still ends it */ }
    }
    playhead = 0;
  }

  function interrupt() {
    if (activeResponse) send({type: "response.cancel"});
    stopPlayback();
    idleStatus();
  }

  // ------------------------------------------------------------------------------------------------------
  // Microphone.

  let workletBlob = null;

  async function workletUrl() {
    // Fetched as a plain GET and handed over as a blob URL: addModule's own fetch is a CORS-mode module request
    // with an Origin header, which the server's gate takes for another site when a proxy rewrote the Host.
    if (workletBlob) return workletBlob;
    const key = $("apikey").value.trim();
    const r = await fetch(STATIC_BASE + "pcm-worklet.js", {headers: key ? {Authorization: "Bearer " + key} : {}});
    if (!r.ok) throw new Error(`GET ${STATIC_BASE}pcm-worklet.js: HTTP ${r.status}`);
    workletBlob = URL.createObjectURL(new Blob([await r.text()], {type: "text/javascript"}));
    return workletBlob;
  }

  async function startMic() {
    micStream = await navigator.mediaDevices.getUserMedia(
      {audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true}});
    const source = micStream;
    // A 24 kHz context first (no resampling anywhere); a browser that cannot feed a microphone into it gets
    // its own rate, and the worklet resamples.
    const module = await workletUrl();
    for (const options of [{sampleRate: RATE}, {}]) {
      const ctx = new AudioContext(options);
      try {
        await ctx.audioWorklet.addModule(module);
        const input = ctx.createMediaStreamSource(source);
        const node = new AudioWorkletNode(ctx, "pcm-capture",
                                          {processorOptions: {targetRate: RATE, chunkSamples: CHUNK}});
        const sink = ctx.createGain();  // silent: the node only needs to be pulled by the graph
        sink.gain.value = 0;
        input.connect(node);
        node.connect(sink);
        sink.connect(ctx.destination);
        node.port.onmessage = (e) => onMicChunk(e.data);
        micCtx = ctx;
        return;
      } catch (err) {
        await ctx.close();
        if (Object.keys(options).length === 0) throw err;
      }
    }
  }

  function onMicChunk(f32) {
    let sum = 0;
    for (let i = 0; i < f32.length; i++) sum += f32[i] * f32[i];
    const level = Math.min(1, Math.sqrt(sum / f32.length) * 4);
    $("meter").firstElementChild.style.width = (level * 100).toFixed(0) + "%";
    if (!stats.sessionCreated) return;
    if (send({type: "input_audio_buffer.append", audio: pcm16Base64(f32)})) stats.audioChunksSent++;
  }

  // ------------------------------------------------------------------------------------------------------
  // Camera.

  async function startCamera() {
    if (camStream) return;
    camStream = await navigator.mediaDevices.getUserMedia({video: {width: {ideal: 640}, height: {ideal: 480}}});
    $("preview").srcObject = camStream;
    camTimer = setInterval(sendFrame, FRAME_MS);
  }

  function stopCamera() {
    clearInterval(camTimer);
    camTimer = null;
    if (camStream) camStream.getTracks().forEach((t) => t.stop());
    camStream = null;
    $("preview").srcObject = null;
  }

  function sendFrame() {
    const video = $("preview");
    if (!stats.sessionCreated || video.readyState < 2 || !video.videoWidth) return;
    if (ws && ws.bufferedAmount > (1 << 20)) return;  // a slow link: skip frames rather than queue them
    const scale = Math.min(1, FRAME_SIDE / Math.max(video.videoWidth, video.videoHeight));
    const canvas = $("frame");
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    const jpeg = canvas.toDataURL("image/jpeg", 0.8).split(",")[1];
    if (send({type: "input_image_buffer.append", image: jpeg})) {
      stats.imagesSent++;
      note("sent input_image_buffer.append");
    }
  }

  async function toggleCamera() {
    try {
      if ($("camera").checked) await startCamera();
      else stopCamera();
    } catch (err) {
      $("camera").checked = false;
      fail("camera: " + err.message);
    }
  }

  // ------------------------------------------------------------------------------------------------------
  // Start-up.

  async function ensureAudio() {
    if (!playCtx) {
      try {
        playCtx = new AudioContext({sampleRate: RATE});
      } catch (err) {
        playCtx = new AudioContext();  // the browser picks the rate; buffers stay 24 kHz and it resamples
      }
    }
    if (!micCtx) await startMic();
    const contexts = [playCtx, micCtx];
    const track = () => Object.assign(stats.audio, {mic: micCtx.state, micRate: micCtx.sampleRate,
                                                    playback: playCtx.state});
    contexts.forEach((c) => c.addEventListener("statechange", track));
    track();
    await Promise.all(contexts.map((c) => c.state === "suspended" ? c.resume().catch(() => {}) : null));
    if (contexts.some((c) => c.state !== "running")) {
      // Autoplay policy: audio starts after the first click on the page.
      setStatus("", "click the page to start audio");
      document.addEventListener("click", () => contexts.forEach((c) => c.resume()), {once: true});
    }
  }

  async function start() {
    try {
      await ensureAudio();
    } catch (err) {
      fail("microphone: " + err.message);
    }
    try {
      await connect();
    } catch (err) {
      fail(err.message);
    }
  }

  async function init() {
    try { $("apikey").value = sessionStorage.getItem("omni_jax_api_key") || ""; } catch (e) { /* no storage */ }
    $("connect").onclick = () => (ws ? disconnect() : start());
    $("interrupt").onclick = interrupt;
    $("camera").onchange = toggleCamera;
    let hasCamera = false;
    try {
      const devices = await navigator.mediaDevices.enumerateDevices();
      hasCamera = devices.some((d) => d.kind === "videoinput");
    } catch (err) { /* no device list: no camera */ }
    $("camera").checked = hasCamera && params.get("camera") !== "0";
    if ($("camera").checked) await toggleCamera();
    await start();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
