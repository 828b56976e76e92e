// Viewer page: receive-only WebRTC session with the avatar-agent server, plus the controls of
// the control API: say text (POST /api/say), set one of the 8 emotions (POST /api/emotion),
// interrupt speech (POST /api/interrupt) and live figures (GET /api/status, once a second).
// Query: ?token=T when the server requires a bearer token (sent as Authorization on every call).
// Test flags: ?report=1&frames=N&endpoint=/report POSTs playback figures once N frames have been
// shown (or after 20 s), so a headless browser can prove it decoded the stream.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const jsonHeaders = Object.assign({ "Content-Type": "application/json" },
                                  token ? { Authorization: `Bearer ${token}` } : {});
const video = document.getElementById("video");
const stateEl = document.getElementById("state");
const infoEl = document.getElementById("info");
const unmuteBtn = document.getElementById("unmute");
const reconnectBtn = document.getElementById("reconnect");
let pc = null;
let framesShown = 0;

function setState(s) {
  stateEl.textContent = s;
  stateEl.className = s;
}

// aiortc does not trickle ICE: send the offer once gathering is complete.
function gatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const check = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function countFrames() {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const tick = () => { framesShown += 1; video.requestVideoFrameCallback(tick); };
  video.requestVideoFrameCallback(tick);
}

async function play() {
  try {
    await video.play();
  } catch (e) {
    // Autoplay with sound needs a user gesture in most browsers: start muted, offer a button.
    video.muted = true;
    await video.play().catch(() => {});
    unmuteBtn.hidden = false;
  }
}

async function connect() {
  reconnectBtn.hidden = true;
  setState("connecting");
  pc = new RTCPeerConnection();
  const stream = new MediaStream();
  video.srcObject = stream;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addEventListener("track", (ev) => { stream.addTrack(ev.track); play(); });
  pc.addEventListener("connectionstatechange", () => {
    setState(pc.connectionState);
    if (pc.connectionState === "failed" || pc.connectionState === "closed") reconnectBtn.hidden = false;
  });
  await pc.setLocalDescription(await pc.createOffer());
  await gatheringComplete(pc);
  const resp = await fetch("/offer", {
    method: "POST",
    headers: jsonHeaders,
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
  });
  if (!resp.ok) {
    const msg = await resp.text();
    setState("error");
    infoEl.textContent = `server said ${resp.status}: ${msg}`;
    reconnectBtn.hidden = false;
    throw new Error(msg);
  }
  await pc.setRemoteDescription(await resp.json());
}

async function stats() {
  const out = { framesDecoded: 0, audioSamples: 0, audioEnergy: 0, audioDuration: 0 };
  if (!pc) return out;
  (await pc.getStats()).forEach((s) => {
    if (s.type !== "inbound-rtp") return;
    if (s.kind === "video") out.framesDecoded = s.framesDecoded || 0;
    if (s.kind === "audio") {
      out.audioSamples = s.totalSamplesReceived || 0;
      out.audioEnergy = s.totalAudioEnergy || 0;
      out.audioDuration = s.totalSamplesDuration || 0;
    }
  });
  return out;
}

async function report(endpoint, wanted) {
  const t0 = performance.now();
  while (framesShown < wanted && performance.now() - t0 < 20000) {
    await new Promise((r) => setTimeout(r, 100));
  }
  const stream = video.srcObject;
  const body = Object.assign({
    frames: framesShown,
    width: video.videoWidth,
    height: video.videoHeight,
    audioTracks: stream ? stream.getAudioTracks().length : 0,
    videoTracks: stream ? stream.getVideoTracks().length : 0,
    connectionState: pc ? pc.connectionState : "none",
    muted: video.muted,
  }, await stats());
  await fetch(endpoint, { method: "POST", headers: jsonHeaders, body: JSON.stringify(body) });
}

// ---- control API ------------------------------------------------------------------------------

const sayForm = document.getElementById("say-form");
const sayText = document.getElementById("say-text");
const interruptBtn = document.getElementById("interrupt");
const messageEl = document.getElementById("message");
const statsEl = document.getElementById("stats");
const emotionBtns = Array.from(document.querySelectorAll("#emotions button[data-emotion]"));

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function showMessage(text, isError = false) {
  messageEl.textContent = text;
  messageEl.className = isError ? "error" : "";
}

// One JSON call; a refusal becomes an ApiError carrying the server's {"error": ...} text.
async function api(method, path, body) {
  const init = { method, headers: jsonHeaders };
  if (body !== undefined) init.body = JSON.stringify(body);
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "the avatar-agent server is not reachable");
  }
  let data = {};
  try { data = await resp.json(); } catch (e) { /* an empty or non-JSON body */ }
  if (!resp.ok) throw new ApiError(resp.status, data.error || resp.statusText || "request failed");
  return data;
}

function refused(what, e) {
  // 404: this server has no control API mounted (an old server or one without it).
  const why = e.status === 404 ? "this server has no control API" : e.message;
  showMessage(`Could not ${what}: ${why}` + (e.status ? ` (HTTP ${e.status})` : ""), true);
}

async function say() {
  const text = sayText.value;
  try {
    const r = await api("POST", "/api/say", { text });
    showMessage(`Speaking (utterance ${r.utterance}).`);
    sayText.value = "";
  } catch (e) {
    refused("say that", e);
  }
}

sayForm.addEventListener("submit", (ev) => { ev.preventDefault(); say(); });
sayText.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); say(); }
});

interruptBtn.addEventListener("click", async () => {
  try {
    const r = await api("POST", "/api/interrupt");
    showMessage(r.utterance != null ? `Interrupted utterance ${r.utterance}.` : "Nothing was playing.");
  } catch (e) {
    refused("interrupt", e);
  }
});

function markEmotion(name) {
  emotionBtns.forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.emotion === name)));
}

emotionBtns.forEach((btn) => btn.addEventListener("click", async () => {
  try {
    await api("POST", "/api/emotion", { name: btn.dataset.emotion, intensity: 1.0 });
    markEmotion(btn.dataset.emotion);
    showMessage(`Emotion: ${btn.dataset.emotion}.`);
  } catch (e) {
    refused(`set ${btn.dataset.emotion}`, e);
  }
}));

const EMOTIONS = emotionBtns.map((b) => b.dataset.emotion);

// Live figures.  /api/status carries the player's counters; unknown or missing keys are skipped.
async function pollStatus() {
  try {
    const st = await api("GET", "/api/status");
    const parts = [];
    const add = (label, v) => { if (v !== undefined && v !== null) parts.push(`${label} ${v}`); };
    add("frames", st.delivered);
    add("speech", st.speech);
    add("idle", st.idle);
    add("late", st.late_dropped);
    add("dropped", st.overflow_dropped);
    add("underruns", st.underruns);
    add("buffered", st.frames_buffered);
    if (st.lateness_max_s !== undefined) add("max lateness", `${Math.round(st.lateness_max_s * 1000)} ms`);
    const q = st.speech_queue;
    if (q && q.queued_s !== undefined) add("queued", `${Number(q.queued_s).toFixed(1)} s`);
    if (typeof st.emotion === "number" && EMOTIONS[st.emotion]) markEmotion(EMOTIONS[st.emotion]);
    statsEl.textContent = parts.join(" · ");
  } catch (e) {
    statsEl.textContent = e.status === 404 ? "" : `status unavailable: ${e.message}`;
  }
}
setInterval(pollStatus, 1000);
pollStatus();

unmuteBtn.addEventListener("click", () => { video.muted = false; video.play(); unmuteBtn.hidden = true; });
reconnectBtn.addEventListener("click", () => { if (pc) pc.close(); connect().catch(console.error); });
setInterval(() => {
  if (video.videoWidth) infoEl.textContent = `${video.videoWidth}×${video.videoHeight}, ${framesShown} frames`;
}, 500);

countFrames();
connect().catch((e) => console.error(e));
if (params.get("report")) {
  report(params.get("endpoint") || "/report", parseInt(params.get("frames") || "30", 10))
    .catch((e) => console.error(e));
}
