// transcribe-client.js: a small, dependency-free client for the /ws/transcribe protocol (version 1).
// Import it from a browser or a Vue/Nuxt app:
//   import { TranscribeClient } from "/static/transcribe-client.js";
// It owns one WebSocket session; it does not capture audio (send whatever frames you have).

/**
 * @typedef {"pcm_s16le"|"pcm_f32le"|"webm"|"ogg"|"mp4"|"wav"|"mp3"|"flac"} Encoding
 *
 * @typedef {object} SessionOptions
 * @property {string} [url]            WebSocket URL; default: /ws/transcribe on the page's own host
 * @property {string} [token]          API token, offered as the WebSocket subprotocol "rta.token.<base64url>"
 *                                     (browsers cannot set headers; it never appears in a URL)
 * @property {Encoding} [encoding]     default pcm_s16le
 * @property {number} [sampleRate]     raw PCM only; default 16000
 * @property {number} [channels]       raw PCM only; default 1
 * @property {string|null} [language]  ISO code, or null to detect
 * @property {"transcribe"|"translate"} [task]
 * @property {string} [prompt]         domain words or context, sent in a config message
 * @property {boolean} [interimResults] default true
 * @property {number} [historySeconds] raw PCM kept for a resume after a server restart; default 60
 *
 * @typedef {{word: string, start: number, end: number}} WordTiming
 *
 * @typedef {object} Transcription
 * @property {"transcription"} type
 * @property {number} segment_id
 * @property {boolean} is_final
 * @property {string} text
 * @property {number} start
 * @property {number} end
 * @property {string|null} language
 * @property {number} lag
 * @property {WordTiming[]} [words]
 *
 * @typedef {{type: "error", code: string, message: string}} ServerError
 *
 * @typedef {object} ShuttingDown  sent before a close with 1001: the server restarts
 * @property {"status"} type
 * @property {"shutting_down"} status
 * @property {string} session_id
 * @property {{segment_id: number, at: number, bytes: number|null}} resume  finals from `segment_id` on
 *           cover the audio from byte `bytes`: resend from there in a new session, which replaces them
 *
 * @typedef {object} Completed
 * @property {"status"} type
 * @property {"completed"} status
 * @property {string} session_id
 * @property {string} text
 * @property {number} duration
 * @property {number} segments
 * @property {{audio: string, bytes: number, sha256: string}} recording
 */

/** Events (each a CustomEvent whose `detail` is the server message, or as noted):
 *  "connected", "configured", "partial" (Transcription), "final" (Transcription),
 *  "speech_started", "speech_ended", "flushed", "completed" (Completed), "shutting_down" (ShuttingDown),
 *  "error" (ServerError),
 *  "close" ({code, reason, wasClean}). */
export class TranscribeClient extends EventTarget {
  /** @param {SessionOptions} [options] */
  constructor(options = {}) {
    super();
    this.options = options;
    /** @type {WebSocket|null} */
    this.socket = null;
    /** @type {string|null} */
    this.sessionId = null;
    /** @type {Transcription[]} finals received so far, in segment order */
    this.finals = [];
    /** @type {Completed|null} */
    this.completed = null;
    /** @type {ShuttingDown|null} */
    this.shutdown = null;
    this.bytesSent = 0;
    // Raw PCM sent lately ([offset, bytes] pairs), so that a session the server ends early (a restart)
    // can be continued elsewhere from where it stopped: see audioFrom().
    /** @type {Array<[number, Uint8Array]>} */
    this.history = [];
    const o = this.options;
    const width = o.encoding === "pcm_f32le" ? 4 : 2;
    this.historyLimit = (o.historySeconds ?? 60) * (o.sampleRate || 16000) * (o.channels || 1) * width;
  }

  /** Whether audio can be resent from any byte (raw PCM; a container stream cannot be cut). */
  get resumable() {
    const encoding = this.options.encoding || "pcm_s16le";
    return encoding === "pcm_s16le" || encoding === "pcm_f32le";
  }

  /** The audio sent from byte `offset` of this session on (as far back as the history reaches).
   * @param {number} offset @returns {Uint8Array[]} */
  audioFrom(offset) {
    const pieces = [];
    for (const [start, bytes] of this.history) {
      if (start + bytes.byteLength <= offset) continue;
      pieces.push(start >= offset ? bytes : bytes.subarray(offset - start));
    }
    return pieces;
  }

  /** The session URL with the configuration in its query string. */
  url() {
    const o = this.options;
    const base = o.url || `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/transcribe`;
    const url = new URL(base);
    const params = {
      encoding: o.encoding,
      sample_rate: o.sampleRate,
      channels: o.channels,
      language: o.language,
      task: o.task,
      interim_results: o.interimResults === false ? "false" : undefined,
    };
    for (const [name, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
    }
    return url.toString();
  }

  /** The subprotocols to offer: "rta.v1", and the token (base64url) when there is one. */
  protocols() {
    const token = this.options.token;
    if (!token) return [];
    const bytes = new TextEncoder().encode(token);
    let binary = "";
    for (const byte of bytes) binary += String.fromCharCode(byte);
    const encoded = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    return ["rta.v1", `rta.token.${encoded}`];
  }

  /** Open the session; resolves with the `connected` status, rejects with the refusal. */
  connect() {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(this.url(), this.protocols());
      socket.binaryType = "arraybuffer";
      this.socket = socket;
      let connected = false;
      /** @type {ServerError|null} */
      let refusal = null;
      socket.onmessage = (event) => {
        if (typeof event.data !== "string") return;
        const message = JSON.parse(event.data);
        if (!connected && message.type === "status" && message.status === "connected") {
          connected = true;
          this.sessionId = message.session_id;
          if (this.options.prompt) this.sendJson({ type: "config", prompt: this.options.prompt });
          resolve(message);
        } else if (!connected && message.type === "error") {
          refusal = message;
        }
        this._dispatch(message);
      };
      socket.onclose = (event) => {
        if (!connected) {
          const error = new Error(refusal ? `${refusal.code}: ${refusal.message}` : `connection closed (${event.code})`);
          reject(Object.assign(error, { code: event.code })); // the close code, for a retry decision
        }
        this._emit("close", { code: event.code, reason: event.reason, wasClean: event.wasClean });
      };
    });
  }

  /** @param {any} message */
  _dispatch(message) {
    if (message.type === "transcription") {
      if (message.is_final) this.finals.push(message);
      this._emit(message.is_final ? "final" : "partial", message);
    } else if (message.type === "status") {
      if (message.status === "completed") this.completed = message;
      if (message.status === "shutting_down") this.shutdown = message;
      this._emit(message.status, message);
    } else {
      this._emit(message.type, message);
    }
  }

  /** @param {string} name @param {any} detail */
  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }

  /** Subscribe to an event; returns a function that unsubscribes.
   * @param {string} name @param {(detail: any) => void} handler */
  on(name, handler) {
    const listener = (/** @type {Event} */ event) => handler(/** @type {CustomEvent} */ (event).detail);
    this.addEventListener(name, listener);
    return () => this.removeEventListener(name, listener);
  }

  get isOpen() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  /** Send one frame of audio in the session's encoding.
   * @param {ArrayBuffer|ArrayBufferView|Blob} data */
  sendAudio(data) {
    if (!this.isOpen) return false;
    const size = data instanceof Blob ? data.size : data.byteLength;
    /** @type {WebSocket} */ (this.socket).send(data);
    if (this.resumable && !(data instanceof Blob)) {
      const view = ArrayBuffer.isView(data)
        ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
        : new Uint8Array(data);
      this.history.push([this.bytesSent, view.slice()]);
      while (this.history.length > 1 && this.bytesSent + size - this.history[1][0] >= this.historyLimit) {
        this.history.shift();
      }
    }
    this.bytesSent += size;
    return true;
  }

  /** @param {object} message */
  sendJson(message) {
    if (this.isOpen) /** @type {WebSocket} */ (this.socket).send(JSON.stringify(message));
  }

  /** Finalize everything said so far; the session stays open. */
  flush() {
    this.sendJson({ type: "flush" });
  }

  keepalive() {
    this.sendJson({ type: "keepalive" });
  }

  /** End the stream; resolves with `completed` once the server has sent the last finals.
   * @returns {Promise<Completed>} */
  end() {
    return new Promise((resolve, reject) => {
      if (!this.isOpen) {
        reject(new Error("the session is not open"));
        return;
      }
      const offCompleted = this.on("completed", (message) => {
        offCompleted();
        resolve(message);
      });
      const offClose = this.on("close", (info) => {
        offClose();
        if (!this.completed) reject(new Error(`closed before completion (${info.code})`));
      });
      /** @type {WebSocket} */ (this.socket).send("END");
    });
  }

  /** Drop the connection without ending the stream. */
  close() {
    if (this.socket) this.socket.close();
  }

  /** The transcript so far: the finals' texts in segment order. */
  get text() {
    return [...this.finals]
      .sort((a, b) => a.segment_id - b.segment_id)
      .map((f) => f.text.trim())
      .filter(Boolean)
      .join(" ");
  }
}
