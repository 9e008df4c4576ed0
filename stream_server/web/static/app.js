// Live captions: the speaker page (microphone → /v1/stream), the overlay (/?mode=overlay) and the
// audience page (/watch/{id}, from GET /v1/sessions/{id}/events). Protocol: protocol.md; browser
// tokens: docs/browser.md. No dependencies, no build step.

import { allCues, clock, renderSrt, renderTxt, renderVtt } from "./cues.js";

const $ = (id) => document.getElementById(id);
const root = document.documentElement;
const params = new URLSearchParams(location.search);
const MODE = root.dataset.mode === "watch" ? "watch" : "speaker";
const OVERLAY = params.get("mode") === "overlay";
const RATE = 16000;
const FRAME_MS = 40; // 640 samples per binary frame: within the 20–100 ms the server is tuned for
const MAX_PENDING_S = 30; // audio kept while reconnecting, sent when the connection is back
const SETTINGS_KEY = "stream-server.captions.settings";

// What tests and curious users can read from the console: window.captions.
const stats = { state: "idle", sessionId: null, sessions: [], latencies: [], framesSent: 0, frameMs: FRAME_MS, reconnects: 0 };
window.captions = stats;

// ------------------------------------------------------------------------------------- tokens

// A site that embeds this page with API keys on passes ?token_endpoint=<its URL>: the page POSTs
// there for a fresh single-use token before each connection (the site's backend exchanges its key
// at POST /v1/realtime/client_secrets). A single token may also come in the fragment (#token=...).
const tokenEndpoint = params.get("token_endpoint");
let fragmentToken = new URLSearchParams(location.hash.slice(1)).get("token");
if (fragmentToken) history.replaceState(null, "", location.pathname + location.search);

async function getToken(scope, sessionId) {
  if (fragmentToken) {
    const token = fragmentToken;
    fragmentToken = null;
    return token;
  }
  if (!tokenEndpoint) return null;
  const url = new URL(tokenEndpoint, location.href);
  url.searchParams.set("scope", scope);
  if (sessionId) url.searchParams.set("session_id", sessionId);
  const response = await fetch(url, { method: "POST", credentials: "include", cache: "no-store" });
  if (!response.ok) throw new Error(`the token endpoint answered ${response.status}`);
  const body = await response.json();
  const token = body.value || (body.client_secret && body.client_secret.value) || body.token;
  if (!token) throw new Error("the token endpoint sent no token");
  return token;
}

// ---------------------------------------------------------------------------------- the view

const transcriptEl = $("transcript");
const utterances = []; // {key, start, end, text, interim, words, speaker, el, finalEl, interimEl}
const byItem = new Map();
let stick = true; // auto-scroll while the reader is at the bottom
let followedTop = 0; // scrollTop and bottom edge where auto-scroll last left the view
let followedBottom = 0;

function setState(state, text) {
  stats.state = state;
  const pill = $("state");
  pill.dataset.state = state;
  pill.textContent = text;
}

function notice(text) {
  $("notice").textContent = text;
}

function clearTranscript() {
  utterances.length = 0;
  byItem.clear();
  transcriptEl.replaceChildren();
  renderOverlay();
}

function lineFor(key, start, speaker) {
  let u = byItem.get(key);
  if (u) return u;
  $("placeholder")?.remove();
  u = { key, start, end: start, text: "", interim: "", words: [], speaker: speaker || null, final: false };
  const el = document.createElement("p");
  el.className = "line";
  const time = document.createElement("time");
  time.textContent = clock(start);
  time.dateTime = `PT${start.toFixed(1)}S`;
  const body = document.createElement("span");
  if (speaker) {
    const who = document.createElement("span");
    who.className = "speaker";
    who.textContent = `${speaker}:`;
    body.append(who);
  }
  u.finalEl = document.createElement("span");
  u.finalEl.className = "final";
  u.interimEl = document.createElement("span");
  u.interimEl.className = "interim";
  u.interimEl.setAttribute("aria-hidden", "true"); // screen readers hear finals only
  body.append(u.finalEl, u.interimEl);
  el.append(time, body);
  u.el = el;
  transcriptEl.append(el);
  utterances.push(u);
  byItem.set(key, u);
  return u;
}

function showInterim(u) {
  const tail = u.interim.trim();
  u.interimEl.textContent = tail ? (u.text.trim() ? " " : "") + tail : "";
}

function addFinal(u, delta, words, offset) {
  if (!delta) return;
  const text = u.text ? delta : delta.replace(/^\s+/, "");
  u.text += text;
  u.finalEl.append(document.createTextNode(text)); // an addition: announced by the live region
  for (const w of words || []) u.words.push({ word: w.word, start: w.start + offset, end: w.end + offset });
  // The interim was the tail after the previous delta: drop what has now become final.
  const said = delta.trim();
  u.interim = u.interim.trim().startsWith(said) ? u.interim.trim().slice(said.length) : "";
  showInterim(u);
}

function finishLine(u, seg, offset) {
  const text = String(seg.text || "").trim();
  if (text && u.text.trim() !== text) {
    u.text = text;
    u.finalEl.textContent = text;
  }
  u.start = seg.start + offset;
  u.end = seg.end + offset;
  if (Array.isArray(seg.words)) u.words = seg.words.map((w) => ({ word: w.word, start: w.start + offset, end: w.end + offset }));
  u.interim = "";
  u.final = true;
  showInterim(u);
  if (!u.text.trim()) {
    u.el.remove();
    utterances.splice(utterances.indexOf(u), 1);
  }
}

function closeOpenLines() {
  for (const u of utterances) {
    if (u.final) continue;
    u.final = true;
    u.interim = "";
    showInterim(u);
    if (!u.text.trim()) {
      u.el.remove();
    }
  }
  for (let i = utterances.length - 1; i >= 0; i--) if (!utterances[i].text.trim() && utterances[i].final) utterances.splice(i, 1);
}

function noteFollowed() {
  followedTop = transcriptEl.scrollTop;
  followedBottom = followedTop + transcriptEl.clientHeight;
}

function followToBottom() {
  transcriptEl.scrollTop = transcriptEl.scrollHeight;
  noteFollowed();
}

function setStick(value) {
  stick = value;
  $("jump").hidden = value;
}

function changed() {
  // A reader's scroll reaches the "scroll" listener only with the next frame. Captions that
  // arrive in between must not pull the view back down: a view whose top and bottom edge both
  // moved up since auto-scroll left it was scrolled by the reader. (Either edge alone moves
  // when the viewport is resized.)
  const top = transcriptEl.scrollTop;
  if (stick && top < followedTop - 1 && top + transcriptEl.clientHeight < followedBottom - 1) setStick(false);
  if (stick) followToBottom();
  renderOverlay();
}

transcriptEl.addEventListener("scroll", () => {
  setStick(transcriptEl.scrollHeight - transcriptEl.scrollTop - transcriptEl.clientHeight < 40);
  if (stick) noteFollowed();
});
$("jump").addEventListener("click", () => {
  setStick(true);
  followToBottom();
  transcriptEl.focus();
});

function renderOverlay() {
  if (!OVERLAY) return;
  const box = $("overlay-lines");
  // The last one or two lines of about 42 characters, the open utterance's interim tail lighter.
  const recent = utterances.slice(-2).filter((u) => (u.text + u.interim).trim());
  const words = [];
  for (const u of recent) {
    for (const w of u.text.split(/\s+/).filter(Boolean)) words.push({ w, interim: false });
    for (const w of u.interim.split(/\s+/).filter(Boolean)) words.push({ w, interim: true });
  }
  const lines = [];
  let line = [];
  for (const item of words) {
    const length = line.reduce((n, x) => n + x.w.length + 1, 0) + item.w.length;
    if (line.length && length > 42) {
      lines.push(line);
      line = [];
    }
    line.push(item);
  }
  if (line.length) lines.push(line);
  box.replaceChildren(
    ...lines.slice(-2).map((l) => {
      const span = document.createElement("span");
      span.className = "ol";
      l.forEach((item, i) => {
        const word = document.createElement("span");
        if (item.interim) word.className = "interim";
        word.textContent = (i ? " " : "") + item.w;
        span.append(word);
      });
      return span;
    }),
  );
}

// ------------------------------------------------------------------------------- downloads

function finalSegments() {
  return utterances.filter((u) => u.text.trim()).map((u) => ({ text: u.text.trim(), start: u.start, end: Math.max(u.end, u.start), words: u.words }));
}

function stamp() {
  const d = new Date();
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}`;
}

function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type: `${type};charset=utf-8` }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    notice("Copied.");
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    notice("Copied.");
  }
}

const baseName = () => (MODE === "watch" ? `captions-${root.dataset.session}` : `captions-${stamp()}`);
$("copy").addEventListener("click", () => copyText(renderTxt(finalSegments())));
$("dl-txt").addEventListener("click", () => download(`${baseName()}.txt`, renderTxt(finalSegments()), "text/plain"));
$("dl-srt").addEventListener("click", () => download(`${baseName()}.srt`, renderSrt(allCues(finalSegments())), "application/x-subrip"));
$("dl-vtt").addEventListener("click", () => download(`${baseName()}.vtt`, renderVtt(allCues(finalSegments())), "text/vtt"));

// ---------------------------------------------------------------------------- event handling

// Native events (protocol.md), from the WebSocket (speaker) or Server-Sent Events (audience).
// `offset` places a session's audio times on the page's timeline (sessions after a reconnect
// start again at 0).
function handleEvent(ev, offset) {
  const key = (item) => `${offset}:${item}`;
  switch (ev.type) {
    case "input_audio_buffer.speech_started":
      lineFor(key(ev.item_id), offset + ev.audio_start_ms / 1000, ev.speaker);
      break;
    case "transcript.text.interim": {
      const u = lineFor(key(ev.item_id), offset, ev.speaker);
      u.interim = ev.text || "";
      showInterim(u);
      if (!stats.firstInterimAt) stats.firstInterimAt = performance.now();
      break;
    }
    case "transcript.text.delta": {
      const u = lineFor(key(ev.item_id), offset, ev.speaker);
      addFinal(u, ev.delta, ev.words, offset);
      if (!stats.firstFinalAt) stats.firstFinalAt = performance.now();
      break;
    }
    case "transcript.segment": {
      const u = lineFor(key(ev.item_id), offset + ev.start, ev.speaker);
      finishLine(u, ev, offset);
      break;
    }
    case "error":
      notice(`Server: ${ev.error && ev.error.message}`);
      break;
    default:
      return;
  }
  changed();
}

// ------------------------------------------------------------------------------ the speaker

const speaker = {
  running: false, // capture wanted (Start pressed)
  closing: false, // session.close sent, waiting for the last finals
  ws: null,
  ready: false, // socket open and configured
  attempt: 0,
  timer: null,
  offset: 0, // seconds of the page's timeline where the current session's audio starts
  captured: 0, // samples captured since Start
  pending: [], // [{pcm, first, at}] frames waiting for a connection
  sent: [], // [{end, at}] per sent frame of this session: its last sample (session time) and capture time
  sessionSamples: 0,
  media: null,
  ctx: null,
  node: null,
  models: [],
  defaultModel: null,
};

function wsUrl(path) {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
}

function loadSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  } catch {
    return {};
  }
}

function saveSettings() {
  const s = { mic: $("mic").value, model: $("model").value, language: $("language").value, translate: $("translate").checked, silence: $("vad-silence").value, threshold: $("vad-threshold").value, echo: $("echo").checked, noise: $("noise").checked, agc: $("agc").checked };
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(s));
  } catch {
    /* private mode: settings are not kept */
  }
}

function clampNumber(input, lo, hi, fallback) {
  const v = Number(input.value);
  if (!Number.isFinite(v)) return fallback;
  return Math.min(hi, Math.max(lo, v));
}

function sessionConfig() {
  const config = {
    interim_results: true,
    include: ["words"],
    turn_detection: {
      type: "server_vad",
      threshold: clampNumber($("vad-threshold"), 0, 1, 0.5),
      silence_duration_ms: Math.round(clampNumber($("vad-silence"), 0, 5000, 500)),
    },
  };
  const language = $("language").value;
  if (language) config.language = language;
  const model = $("model").value;
  if (model && model !== speaker.defaultModel) config.model = model;
  config.task = translating() ? "translate" : "transcribe"; // sent either way: an update merges
  return config;
}

// English text of any speech (Whisper's translate task), for a multilingual model only: an
// English-only one has no such task, so the box is off and disabled with one.
function translating() {
  return $("translate").checked && !$("translate").disabled;
}

const languageNames = (() => {
  try {
    return new Intl.DisplayNames([navigator.language || "en"], { type: "language" });
  } catch {
    return null;
  }
})();

function fillLanguages(saved) {
  const select = $("language");
  const card = speaker.models.find((m) => m.id === $("model").value);
  const codes = card ? card.languages : [];
  const options = [];
  if (codes.length !== 1) options.push(new Option("Automatic", ""));
  for (const code of codes) {
    let name = code;
    try {
      name = (languageNames && languageNames.of(code)) || code;
    } catch {
      /* an unusual code: keep it */
    }
    options.push(new Option(`${name} (${code})`, code));
  }
  options.sort((a, b) => (a.value === "" ? -1 : b.value === "" ? 1 : a.text.localeCompare(b.text)));
  select.replaceChildren(...options);
  if (saved !== undefined && [...select.options].some((o) => o.value === saved)) select.value = saved;
  $("translate").disabled = codes.length <= 1;
}

async function loadModels(saved) {
  try {
    const response = await fetch("/v1/models", { cache: "no-store" });
    const body = await response.json();
    speaker.models = body.data.filter((m) => m.source !== "alias");
    const def = speaker.models.find((m) => m.default) || speaker.models[0];
    speaker.defaultModel = def ? def.id : null;
    $("model").replaceChildren(...speaker.models.map((m) => new Option(m.default ? `${m.id} (default)` : m.id, m.id)));
    $("model").value = saved.model && speaker.models.some((m) => m.id === saved.model) ? saved.model : speaker.defaultModel;
    fillLanguages(saved.language);
  } catch (err) {
    notice(`Could not list models: ${err.message}`);
  }
}

async function listMicrophones() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const select = $("mic");
  const current = select.value || loadSettings().mic || "";
  const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "audioinput");
  const options = [new Option("Default microphone", "")];
  devices.forEach((d, i) => {
    if (d.deviceId && d.deviceId !== "default") options.push(new Option(d.label || `Microphone ${i + 1}`, d.deviceId));
  });
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

function setLevel(rms) {
  const db = rms > 0 ? 20 * Math.log10(rms) : -100;
  $("level").value = Math.max(0, Math.min(1, (db + 60) / 60));
}

async function startCapture() {
  const deviceId = $("mic").value;
  const audio = {
    channelCount: 1,
    echoCancellation: $("echo").checked,
    noiseSuppression: $("noise").checked,
    autoGainControl: $("agc").checked,
  };
  if (deviceId) audio.deviceId = { exact: deviceId };
  speaker.media = await navigator.mediaDevices.getUserMedia({ audio });
  let ctx;
  try {
    ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
  } catch {
    ctx = new AudioContext({ latencyHint: "interactive" }); // the worklet resamples
  }
  speaker.ctx = ctx;
  await ctx.audioWorklet.addModule("/static/capture-worklet.js");
  const source = ctx.createMediaStreamSource(speaker.media);
  const node = new AudioWorkletNode(ctx, "pcm16-capture", { numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { frameMs: FRAME_MS } });
  node.port.onmessage = (e) => onFrame(e.data);
  source.connect(node);
  node.connect(ctx.destination); // silent: the processor writes no output; this keeps it pulled
  speaker.node = node;
  if (ctx.state !== "running") {
    await ctx.resume().catch(() => {});
  }
  if (ctx.state !== "running") {
    // Autoplay policy: audio starts with the first click or key press on the page.
    notice("Click anywhere (or press a key) to start the audio.");
    if (OVERLAY) $("overlay-start").hidden = false;
    const resume = () => ctx.resume().then(() => {
      notice("");
      $("overlay-start").hidden = true;
    });
    addEventListener("pointerdown", resume, { once: true });
    addEventListener("keydown", resume, { once: true });
  }
  listMicrophones().catch(() => {});
}

function stopCapture() {
  if (speaker.node) {
    speaker.node.port.postMessage("stop");
    speaker.node.disconnect();
  }
  speaker.media?.getTracks().forEach((t) => t.stop());
  speaker.ctx?.close().catch(() => {});
  speaker.node = speaker.media = speaker.ctx = null;
  setLevel(0);
}

function onFrame({ pcm, rms }) {
  setLevel(rms);
  const frame = { pcm, first: speaker.captured, at: performance.now() };
  speaker.captured += pcm.byteLength / 2;
  if (speaker.ready && speaker.ws && speaker.ws.readyState === WebSocket.OPEN) {
    sendFrame(frame);
    return;
  }
  speaker.pending.push(frame);
  const keep = Math.ceil((MAX_PENDING_S * 1000) / FRAME_MS);
  if (speaker.pending.length > keep) speaker.pending.splice(0, speaker.pending.length - keep);
}

function sendFrame(frame) {
  speaker.ws.send(frame.pcm);
  speaker.sessionSamples += frame.pcm.byteLength / 2;
  speaker.sent.push({ end: speaker.sessionSamples, at: frame.at });
  if (speaker.sent.length > 20000) speaker.sent.splice(0, 5000);
  stats.framesSent += 1;
}

function recordLatency(segmentEnd) {
  // End of speech (the segment's end, in this session's audio) was captured at the time of the
  // frame that carried that sample; the final is on screen now.
  const sample = segmentEnd * RATE;
  const frame = speaker.sent.find((f) => f.end >= sample);
  if (!frame) return;
  const seconds = (performance.now() - frame.at) / 1000;
  stats.latencies.push(Math.round(seconds * 1000) / 1000);
  const sorted = [...stats.latencies].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  $("latency").textContent = `latency ${seconds.toFixed(2)} s · median ${median.toFixed(2)} s`;
}

async function connect() {
  clearTimeout(speaker.timer);
  if (!speaker.running) return;
  setState(speaker.attempt ? "reconnecting" : "connecting", speaker.attempt ? "Reconnecting…" : "Connecting…");
  let protocols = [];
  try {
    const token = await getToken("stream");
    if (token) protocols = ["stream-server", `stream-server.token.${token}`];
  } catch (err) {
    notice(`No token: ${err.message}`);
    return scheduleReconnect();
  }
  if (!speaker.running) return;
  const ws = new WebSocket(wsUrl("/v1/stream"), protocols);
  ws.binaryType = "arraybuffer";
  speaker.ws = ws;
  speaker.ready = false;
  let offset = 0;
  ws.onopen = () => {
    speaker.attempt = 0;
    // This session's audio time 0 is the first sample it gets: the oldest frame still waiting.
    const first = speaker.pending.length ? speaker.pending[0].first : speaker.captured;
    offset = first / RATE;
    speaker.offset = offset;
    speaker.sessionSamples = 0;
    speaker.sent = [];
    ws.send(JSON.stringify({ type: "session.update", session: sessionConfig() }));
    speaker.ready = true;
    for (const frame of speaker.pending.splice(0)) sendFrame(frame);
    if (speaker.closing) ws.send(JSON.stringify({ type: "session.close" }));
    setState("live", speaker.closing ? "Finishing…" : "Live");
  };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return;
    const ev = JSON.parse(e.data);
    if (ev.type === "session.created") {
      stats.sessionId = ev.session.id;
      stats.sessions.push(ev.session.id);
      showShareLink(ev.session.id);
    } else if (ev.type === "transcript.text.done") {
      if (speaker.closing) setState("idle", "Stopped");
    } else if (ev.type === "error") {
      notice(`Server: ${ev.error.message}`);
    }
    handleEvent(ev, offset);
    if (ev.type === "transcript.segment") recordLatency(ev.end);
  };
  ws.onclose = (e) => {
    if (speaker.ws !== ws) return;
    speaker.ws = null;
    speaker.ready = false;
    closeOpenLines();
    if (speaker.closing || !speaker.running) {
      speaker.closing = false;
      setState("idle", "Stopped");
      return;
    }
    if (e.code === 1013) notice("The server is busy; retrying.");
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  if (!speaker.running) return;
  speaker.attempt += 1;
  stats.reconnects += 1;
  const delay = Math.min(10000, 500 * 2 ** (speaker.attempt - 1)) * (0.8 + Math.random() * 0.4);
  setState("reconnecting", `Reconnecting in ${Math.ceil(delay / 1000)} s…`);
  speaker.timer = setTimeout(connect, delay);
}

addEventListener("online", () => {
  if (speaker.running && !speaker.ws) connect();
});

function showShareLink(sessionId) {
  const url = new URL(`/watch/${encodeURIComponent(sessionId)}`, location.href);
  if (tokenEndpoint) url.searchParams.set("token_endpoint", tokenEndpoint);
  $("share-link").href = url.pathname + url.search;
  $("share-link").textContent = url.href;
  $("share").hidden = false;
}

async function start() {
  if (speaker.running) return;
  speaker.running = true;
  speaker.closing = false;
  speaker.attempt = 0;
  speaker.captured = 0;
  speaker.pending = [];
  const button = $("start");
  button.textContent = "Stop";
  button.setAttribute("aria-pressed", "true");
  saveSettings();
  try {
    await startCapture();
  } catch (err) {
    speaker.running = false;
    stopCapture();
    button.textContent = "Start";
    button.setAttribute("aria-pressed", "false");
    setState("error", "No microphone");
    notice(`Microphone: ${err.message}`);
    return;
  }
  connect();
}

function stop() {
  if (!speaker.running) return;
  speaker.running = false;
  clearTimeout(speaker.timer);
  stopCapture();
  $("start").textContent = "Start";
  $("start").setAttribute("aria-pressed", "false");
  const ws = speaker.ws;
  if (ws && ws.readyState === WebSocket.OPEN) {
    speaker.closing = true;
    ws.send(JSON.stringify({ type: "session.close" }));
    setState("finishing", "Finishing…");
    setTimeout(() => {
      if (speaker.ws === ws) ws.close();
    }, 20000);
  } else {
    ws?.close();
    speaker.ws = null;
    setState("idle", "Stopped");
  }
}

function liveUpdate() {
  saveSettings();
  if (speaker.ws && speaker.ready) speaker.ws.send(JSON.stringify({ type: "session.update", session: sessionConfig() }));
}

async function restartCapture() {
  saveSettings();
  if (!speaker.running) return;
  stopCapture();
  try {
    await startCapture();
  } catch (err) {
    notice(`Microphone: ${err.message}`);
  }
}

function initSpeaker() {
  const saved = loadSettings();
  if (saved.silence) $("vad-silence").value = saved.silence;
  if (saved.threshold) $("vad-threshold").value = saved.threshold;
  $("echo").checked = !!saved.echo;
  $("noise").checked = !!saved.noise;
  $("agc").checked = !!saved.agc;
  $("translate").checked = !!saved.translate;
  $("start").setAttribute("aria-pressed", "false");
  $("start").addEventListener("click", () => (speaker.running ? stop() : start()));
  $("overlay-start").addEventListener("click", () => {
    $("overlay-start").hidden = true;
    start();
  });
  $("model").addEventListener("change", () => {
    fillLanguages($("language").value);
    liveUpdate();
  });
  for (const id of ["language", "translate", "vad-silence", "vad-threshold"]) $(id).addEventListener("change", liveUpdate);
  for (const id of ["mic", "echo", "noise", "agc"]) $(id).addEventListener("change", restartCapture);
  $("share-copy").addEventListener("click", () => copyText($("share-link").textContent));
  navigator.mediaDevices?.addEventListener?.("devicechange", () => listMicrophones().catch(() => {}));
  listMicrophones().catch(() => {});
  setState("idle", "Not connected");
  const models = loadModels(saved);
  if (params.get("autostart") === "1") {
    models.finally(start);
  } else if (OVERLAY) {
    $("overlay-start").hidden = false;
  }
  initFileBox();
}

// ------------------------------------------------------------------------------ the audience

const audience = { es: null, finished: false, attempt: 0, timer: null };
const WATCH_EVENTS = [
  "session.created",
  "input_audio_buffer.speech_started",
  "transcript.text.interim",
  "transcript.text.delta",
  "transcript.segment",
  "transcript.text.done",
  "session.ended",
];

async function watchSession() {
  const id = root.dataset.session;
  clearTimeout(audience.timer);
  setState(audience.attempt ? "reconnecting" : "connecting", audience.attempt ? "Reconnecting…" : "Connecting…");
  let url = `/v1/sessions/${encodeURIComponent(id)}/events`;
  try {
    const token = await getToken("watch", id);
    if (token) url += `?token=${encodeURIComponent(token)}`;
  } catch (err) {
    notice(`No token: ${err.message}`);
    return watchAgain();
  }
  const es = new EventSource(url);
  audience.es = es;
  for (const type of WATCH_EVENTS) {
    es.addEventListener(type, (e) => {
      const ev = JSON.parse(e.data);
      if (type === "session.created") {
        // The stream starts with the session's segments so far: rebuild from them.
        clearTranscript();
        audience.attempt = 0;
        setState("live", "Live");
        stats.sessionId = ev.session.id;
      } else if (type === "transcript.text.done" || type === "session.ended") {
        audience.finished = true;
        es.close();
        closeOpenLines();
        setState("idle", type === "session.ended" && ev.status === "disconnected" ? "Speaker disconnected" : "Ended");
        return;
      }
      handleEvent(ev, 0);
    });
  }
  es.addEventListener("error", (e) => {
    if (e.data) {
      // A session's own error event (it travels under the same name).
      try {
        notice(`Server: ${JSON.parse(e.data).error.message}`);
      } catch {
        /* not JSON */
      }
      return;
    }
    if (audience.finished || audience.es !== es) return;
    if (es.readyState === EventSource.CLOSED) {
      // Refused (a used token, an unknown session): try again with a fresh token, with backoff.
      es.close();
      watchAgain();
    } else {
      setState("reconnecting", "Reconnecting…");
    }
  });
}

function watchAgain() {
  audience.attempt += 1;
  const delay = Math.min(10000, 500 * 2 ** (audience.attempt - 1));
  setState("reconnecting", audience.attempt > 2 ? "Waiting for the session…" : "Reconnecting…");
  audience.timer = setTimeout(watchSession, delay);
}

function initWatch() {
  const id = root.dataset.session;
  $("watching").textContent = `session ${id}`;
  $("watching").hidden = false;
  document.title = `Captions · ${id}`;
  $("placeholder").textContent = "Waiting for the speaker's captions…";
  watchSession();
}

// ------------------------------------------------------------------------------ the file box

const fileState = { file: null, text: "", legs: false };

function mediaDuration(file) {
  return new Promise((resolve) => {
    const media = document.createElement("audio");
    const url = URL.createObjectURL(file);
    const done = (value) => {
      URL.revokeObjectURL(url);
      resolve(value);
    };
    media.preload = "metadata";
    media.onloadedmetadata = () => done(Number.isFinite(media.duration) ? media.duration : null);
    media.onerror = () => done(null);
    setTimeout(() => done(null), 3000);
    media.src = url;
  });
}

// With a token source (a server with --api-keys), an HTTP request carries a fresh stream token as
// its bearer key (unlike WebSocket and EventSource, fetch and XHR can set headers).
async function authorize(setHeader) {
  const token = await getToken("stream").catch(() => null);
  if (token) setHeader("Authorization", `Bearer ${token}`);
}

// A file's text: transcribed, or translated to English (the same form, docs/http-api.md).
function fileRoute() {
  return translating() ? "/v1/audio/translations" : "/v1/audio/transcriptions";
}

function fileForm(file, extra) {
  const form = new FormData();
  form.append("file", file, file.name);
  const model = $("model").value;
  if (model && model !== speaker.defaultModel) form.append("model", model);
  const language = $("language").value;
  if (language) form.append("language", language);
  // A call recording: each channel is a speaker, transcribed on its own (docs/http-api.md).
  if (fileState.legs) form.append("multichannel", "true");
  for (const [k, v] of Object.entries(extra)) form.append(k, v);
  return form;
}

// While a recording split by channel streams in, each speaker's words so far on a line of its own;
// the conversation in time order replaces them once the server is done.
function legLines(legs) {
  return Object.entries(legs)
    .map(([channel, text]) => `channel ${channel}: ${text.trim()}`)
    .join("\n");
}

async function transcribeFile(file) {
  fileState.file = file;
  fileState.text = "";
  fileState.legs = $("file-legs").checked;
  const legs = {};
  const progress = $("file-progress");
  const status = $("file-state");
  const out = $("file-text");
  progress.hidden = false;
  progress.value = 0;
  out.hidden = false;
  out.textContent = "";
  $("file-tools").hidden = true;
  status.textContent = `Uploading ${file.name}…`;
  const duration = await mediaDuration(file);
  // Upload is the first 20 %; transcription the rest, estimated from the text received against
  // what the file's length usually holds (~14 characters a second), until the server says done.
  const expectedChars = duration ? duration * 14 : null;
  let uploaded = 0;
  const update = () => {
    const spoken = expectedChars ? Math.min(0.97, fileState.text.length / expectedChars) : 0;
    progress.value = 0.2 * uploaded + 0.8 * spoken;
  };
  const xhr = new XMLHttpRequest();
  xhr.open("POST", fileRoute());
  await authorize((name, value) => xhr.setRequestHeader(name, value));
  let seen = 0;
  let finished = false;
  const parse = () => {
    const body = xhr.responseText;
    let cut;
    while ((cut = body.indexOf("\n\n", seen)) !== -1) {
      const block = body.slice(seen, cut);
      seen = cut + 2;
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const ev = JSON.parse(data);
        if (ev.type === "transcript.text.delta") {
          fileState.text += ev.delta;
          if (ev.channel !== undefined) {
            legs[ev.channel] = (legs[ev.channel] || "") + ev.delta;
            out.textContent = legLines(legs);
          } else {
            out.append(document.createTextNode(fileState.text.length === ev.delta.length ? ev.delta.trimStart() : ev.delta));
          }
          status.textContent = "Transcribing…";
        } else if (ev.type === "transcript.text.done") {
          fileState.text = ev.text;
          out.textContent = ev.text.trim();
          finished = true;
        } else if (ev.type === "error") {
          status.textContent = `Failed: ${ev.error.message}`;
        }
      }
    }
    update();
  };
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) uploaded = e.loaded / e.total;
    status.textContent = `Uploading ${file.name}… ${Math.round(uploaded * 100)} %`;
    update();
  };
  xhr.upload.onload = () => {
    uploaded = 1;
    status.textContent = "Transcribing…";
    update();
  };
  xhr.onprogress = parse;
  xhr.onload = () => {
    if (xhr.status !== 200) {
      let message = `HTTP ${xhr.status}`;
      try {
        message = JSON.parse(xhr.responseText).error.message;
      } catch {
        /* not JSON */
      }
      status.textContent = `Failed: ${message}`;
      progress.hidden = true;
      return;
    }
    parse();
    progress.value = 1;
    status.textContent = finished ? `Done: ${file.name}${duration ? ` (${clock(duration)})` : ""}` : "The server ended the stream early.";
    $("file-tools").hidden = !finished;
  };
  xhr.onerror = () => {
    status.textContent = "Failed: the connection was lost.";
    progress.hidden = true;
  };
  xhr.send(fileForm(file, { stream: "true" }));
}

async function fileSubtitles(format) {
  // The server cuts the file's cues by the same rules (from its word timings).
  const status = $("file-state");
  status.textContent = `Preparing .${format}…`;
  const headers = {};
  await authorize((name, value) => (headers[name] = value));
  const response = await fetch(fileRoute(), { method: "POST", headers, body: fileForm(fileState.file, { response_format: format }) });
  if (!response.ok) {
    status.textContent = `Failed: HTTP ${response.status}`;
    return;
  }
  download(`${fileState.file.name.replace(/\.[^.]+$/, "")}.${format}`, await response.text(), format === "srt" ? "application/x-subrip" : "text/vtt");
  status.textContent = `Downloaded .${format}`;
}

function initFileBox() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    if (e.target.files[0]) transcribeFile(e.target.files[0]);
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) transcribeFile(e.dataTransfer.files[0]);
  });
  $("file-copy").addEventListener("click", () => copyText(fileState.text.trim() + "\n"));
  $("file-txt").addEventListener("click", () => download(`${fileState.file.name.replace(/\.[^.]+$/, "")}.txt`, fileState.text.trim() + "\n", "text/plain"));
  $("file-srt").addEventListener("click", () => fileSubtitles("srt"));
  $("file-vtt").addEventListener("click", () => fileSubtitles("vtt"));
}

// ------------------------------------------------------------------------------------ start

if (OVERLAY) {
  root.classList.add("is-overlay");
  const bg = params.get("bg");
  if (bg && bg !== "transparent") {
    root.classList.add("chroma");
    root.style.setProperty("--chroma", /^[0-9a-f]{6}$/i.test(bg) ? `#${bg}` : bg === "blue" ? "#0047bb" : "#00b140");
  }
  $("overlay").setAttribute("aria-hidden", "false");
}
if (MODE === "watch") initWatch();
else initSpeaker();
