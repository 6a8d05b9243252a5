"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const duration = data.duration;
  const playhead = document.getElementById("playhead");
  const clock = document.getElementById("clock");
  const pauseButton = document.getElementById("pause");
  const rows = Array.from(document.querySelectorAll("#transcript tr[data-t]"));

  // G.711 mu-law to linear, as the line carried it.
  const ULAW = new Float32Array(256);
  for (let i = 0; i < 256; i++) {
    const u = ~i & 0xff;
    const t = (((u & 0x0f) << 3) + 0x84) << ((u & 0x70) >> 4);
    ULAW[i] = ((u & 0x80) ? 0x84 - t : t - 0x84) / 32768;
  }

  let context = null;
  let buffers = null;
  let sources = [];
  let playing = null;
  let startedAt = 0;
  let offset = 0;

  const length = Math.max(1, Math.ceil(duration * data.rate));
  const decoded = {};

  function lane(name) {
    if (decoded[name]) return decoded[name];
    const out = decoded[name] = new Float32Array(length);
    for (const [start, text] of data.lanes[name]) {
      const bytes = atob(text);
      for (let i = 0; i < bytes.length && start + i < length; i++) {
        out[start + i] = ULAW[bytes.charCodeAt(i)];
      }
    }
    return out;
  }

  function ensureAudio() {
    if (context) return true;
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) return false;
    context = new Context();
    buffers = {};
    for (const name of ["caller", "agent"]) {
      const buffer = context.createBuffer(1, length, data.rate);
      buffer.copyToChannel(lane(name), 0);
      buffers[name] = buffer;
    }
    return true;
  }

  function position() {
    if (!playing) return offset;
    return Math.min(duration, offset + context.currentTime - startedAt);
  }

  function stopSources() {
    for (const source of sources) {
      source.onended = null;
      source.stop();
    }
    sources = [];
  }

  function play(which) {
    if (!ensureAudio()) return;
    const at = position() >= duration ? 0 : position();
    stopSources();
    context.resume();
    const lanes = which === "both" ? ["caller", "agent"] : [which];
    startedAt = context.currentTime;
    offset = at;
    for (const name of lanes) {
      const source = context.createBufferSource();
      source.buffer = buffers[name];
      source.connect(context.destination);
      source.start(0, at);
      sources.push(source);
    }
    sources[0].onended = () => { offset = duration; playing = null; stopSources(); update(); };
    playing = which;
    pauseButton.disabled = false;
  }

  function pause() {
    offset = position();
    playing = null;
    stopSources();
    pauseButton.disabled = true;
    update();
  }

  function seek(t) {
    const which = playing;
    offset = Math.max(0, Math.min(duration, t));
    if (which) play(which); else update();
  }

  function format(t) {
    const minutes = Math.floor(t / 60);
    const seconds = (t - 60 * minutes).toFixed(2).padStart(5, "0");
    return minutes + ":" + seconds;
  }

  function update() {
    const t = position();
    playhead.style.left = (100 * t / duration) + "%";
    clock.textContent = format(t);
    let current = null;
    for (const row of rows) if (parseFloat(row.dataset.t) <= t) current = row;
    for (const row of rows) row.classList.toggle("current", row === current);
  }

  function frame() {
    update();
    requestAnimationFrame(frame);
  }

  for (const plot of document.querySelectorAll("#timeline .lane .plot")) {
    plot.addEventListener("click", (event) => {
      const box = plot.getBoundingClientRect();
      seek(duration * (event.clientX - box.left) / box.width);
    });
  }
  for (const row of document.querySelectorAll("tr[data-t]")) {
    row.addEventListener("click", () => seek(parseFloat(row.dataset.t)));
  }
  for (const button of document.querySelectorAll("button.play")) {
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      play(button.dataset.lane);
    });
  }
  pauseButton.addEventListener("click", pause);
  window.callReport = { seek, play, pause, position, duration, lane };
  requestAnimationFrame(frame);
})();
