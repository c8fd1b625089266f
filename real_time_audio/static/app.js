// The page's logic: capture the microphone, stream it with TranscribeClient, show the text.
// Capture uses an AudioWorklet producing 16 kHz PCM16; where that is missing (or with
// ?capture=recorder) MediaRecorder's WebM/Opus or MP4/AAC stream is sent instead.
import { TranscribeClient } from "/static/transcribe-client.js";

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), stop: $("stop"), resume: $("resume"), finish: $("finish"),
  language: $("language"), token: $("token"), finals: $("finals"), partial: $("partial"),
  connection: $("connection"), speech: $("speech"), lag: $("lag"), status: $("status"), recording: $("recording"),
};
const params = new URLSearchParams(location.search);
// A token may come in the address as #token=… (never sent to a server) or ?token=…; either way it
// is taken out of the address bar, so it stays out of history and bookmarks.
const fragment = new URLSearchParams(location.hash.slice(1));
ui.token.value = fragment.get("token") || params.get("token") || "";
if (fragment.has("token") || params.has("token")) {
  params.delete("token");
  history.replaceState(null, "", location.pathname + (params.size ? `?${params}` : ""));
}
const RECORDER_TYPES = [
  ["audio/webm;codecs=opus", "webm"], ["audio/webm", "webm"], ["audio/mp4", "mp4"], ["audio/ogg;codecs=opus", "ogg"],
];
const NO_RETRY = new Set([1000, 1007, 1008, 1009]); // normal end, bad audio, refused, frame too large
const KEEPALIVE_MS = 15000;

let capture = null; // {encoding, start(), pause(), resume(), stop()}
let client = null;
let wanted = "idle"; // what the user asked for: idle | live | paused
let retries = 0;
let keepalive = null;
let sessions = 0; // sessions opened since Start: their finals are told apart in the page
// Raw PCM waiting for a session: captured while reconnecting, or resent after a server restart
// (bounded: the oldest goes first).
let backlog = [];
let backlogBytes = 0;
const BACKLOG_LIMIT = 60 * 16000 * 2;

function sendPcm(data) {
  // After shutting_down the server reads no more: what follows waits for the next session.
  if (client && client.isOpen && !client.shutdown && !backlog.length) {
    client.sendAudio(data);
  } else if (wanted !== "idle") {
    queueAudio([new Uint8Array(data)]);
  }
}

function queueAudio(pieces, first = false) {
  backlog = first ? [...pieces, ...backlog] : [...backlog, ...pieces];
  backlogBytes = backlog.reduce((sum, piece) => sum + piece.byteLength, 0);
  while (backlog.length > 1 && backlogBytes > BACKLOG_LIMIT) backlogBytes -= backlog.shift().byteLength;
}

function sendBacklog() {
  const pieces = backlog;
  backlog = [];
  backlogBytes = 0;
  for (const piece of pieces) client.sendAudio(piece);
}

function setConnection(state, text) {
  ui.connection.dataset.state = state;
  ui.connection.textContent = text || state;
}

function setButtons() {
  ui.start.disabled = wanted !== "idle";
  ui.stop.disabled = wanted !== "live";
  ui.resume.disabled = wanted !== "paused";
  ui.finish.disabled = wanted === "idle";
}

function appendFinal(message) {
  const text = message.text.trim();
  if (!text) return;
  const span = document.createElement("span");
  span.className = "final";
  span.dataset.segment = String(message.segment_id);
  span.dataset.session = String(sessions);
  span.title = `${message.start.toFixed(2)}–${message.end.toFixed(2)} s`;
  span.textContent = (ui.finals.childElementCount ? " " : "") + text;
  ui.finals.append(span);
}

async function openCapture() {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
  });
  const forceRecorder = params.get("capture") === "recorder";
  if (!forceRecorder && window.AudioWorkletNode) {
    const context = new AudioContext({ sampleRate: 16000 });
    await context.audioWorklet.addModule("/static/pcm-worklet.js");
    const source = context.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(context, "pcm-writer");
    node.port.onmessage = (event) => sendPcm(event.data);
    source.connect(node);
    return {
      encoding: "pcm_s16le",
      start() {}, // the worklet runs from the moment it is connected
      pause() { node.port.postMessage("flush"); return context.suspend(); },
      resume() { return context.resume(); },
      stop() { node.port.postMessage("flush"); stream.getTracks().forEach((t) => t.stop()); return context.close(); },
    };
  }
  const [mimeType, encoding] = RECORDER_TYPES.find(([type]) => MediaRecorder.isTypeSupported(type)) || [];
  if (!mimeType) throw new Error("this browser can record neither PCM (AudioWorklet) nor WebM/MP4 audio");
  const recorder = new MediaRecorder(stream, { mimeType });
  recorder.ondataavailable = (event) => event.data.size && client && client.sendAudio(event.data);
  return {
    encoding,
    start() { recorder.start(250); },
    pause() { recorder.requestData(); recorder.pause(); },
    resume() { recorder.resume(); },
    stop() {
      return new Promise((resolve) => {
        recorder.onstop = resolve;
        if (recorder.state !== "inactive") recorder.stop(); else resolve();
        stream.getTracks().forEach((t) => t.stop());
      });
    },
  };
}

// The end of the text so far (200 characters, from a word boundary): a new session after a
// restart hears its first words with what came before them, as the one it replaces would have.
function context() {
  const text = ui.finals.textContent.trim();
  return text.length > 200 ? text.slice(-200).replace(/^\S*\s+/, "") : text;
}

async function connect() {
  client = new TranscribeClient({
    encoding: capture.encoding,
    language: ui.language.value || null,
    token: ui.token.value || undefined,
    prompt: sessions > 0 ? context() || undefined : undefined,
  });
  client.on("partial", (m) => { ui.partial.textContent = " " + m.text.trim(); ui.lag.textContent = `lag ${m.lag.toFixed(1)} s`; });
  client.on("final", (m) => { ui.partial.textContent = ""; appendFinal(m); ui.lag.textContent = `lag ${m.lag.toFixed(1)} s`; });
  client.on("speech_started", () => { ui.speech.dataset.active = "true"; });
  client.on("speech_ended", () => { ui.speech.dataset.active = "false"; });
  client.on("flushed", () => {
    ui.speech.dataset.active = "false";
    ui.status.textContent = "paused: everything said so far is final";
  });
  client.on("error", (m) => { ui.status.textContent = `${m.code}: ${m.message}`; });
  client.on("shutting_down", (m) => {
    // The server restarts: the finals from resume.segment_id on are heard again in the next session.
    if (m.resume.bytes === null) return;
    for (const span of ui.finals.querySelectorAll(`span.final[data-session="${sessions}"]`)) {
      if (Number(span.dataset.segment) >= m.resume.segment_id) span.remove();
    }
    queueAudio(client.audioFrom(m.resume.bytes), true);
  });
  const hello = await client.connect(); // a refusal rejects: the caller decides about a retry
  client.on("close", onClose);
  sessions += 1;
  sendBacklog();
  retries = 0;
  setConnection(wanted === "paused" ? "paused" : "live");
  ui.status.textContent = `session ${hello.session_id} · ${hello.model} on ${hello.device}`;
}

function onClose(info) {
  ui.speech.dataset.active = "false";
  if (wanted === "idle" || NO_RETRY.has(info.code)) {
    if (info.code === 1008) setConnection("error", "refused");
    return;
  }
  // Unexpected drop while recording: reconnect with exponential backoff (a new session). After a
  // restart's shutting_down the next session carries on from where the server stopped reading.
  const restarting = client && client.shutdown !== null && retries === 0;
  const delay = restarting ? 100 : Math.min(10000, 500 * 2 ** retries++);
  setConnection("reconnecting", `reconnecting in ${(delay / 1000).toFixed(1)} s`);
  setTimeout(() => {
    if (wanted !== "idle") connect().catch((error) => { ui.status.textContent = error.message; onClose({ code: error.code ?? 0 }); });
  }, delay);
}

ui.start.onclick = async () => {
  wanted = "live";
  setButtons();
  setConnection("connecting", "connecting");
  try {
    capture = await openCapture();
    await connect();
    capture.start();
    keepalive = setInterval(() => wanted === "paused" && client && client.keepalive(), KEEPALIVE_MS);
  } catch (error) {
    wanted = "idle";
    setButtons();
    setConnection("error", "error");
    ui.status.textContent = error.message;
    if (capture) await capture.stop();
    capture = null;
  }
};

ui.stop.onclick = async () => {
  wanted = "paused";
  setButtons();
  await capture.pause();
  setTimeout(() => client && client.flush(), 50); // after the last captured block has gone out
  setConnection("paused");
};

ui.resume.onclick = async () => {
  wanted = "live";
  setButtons();
  await capture.resume();
  setConnection("live");
};

ui.finish.onclick = async () => {
  wanted = "idle";
  setButtons();
  clearInterval(keepalive);
  await capture.stop();
  capture = null;
  try {
    const done = await client.end();
    ui.partial.textContent = "";
    setConnection("idle", "completed");
    ui.recording.textContent =
      `completed: ${done.duration.toFixed(1)} s, ${done.segments} segments, ${done.recording.bytes} bytes, sha256 ${done.recording.sha256}`;
  } catch (error) {
    ui.status.textContent = error.message;
    setConnection("error", "error");
  }
};

setButtons();
