// The vaekit demo page: plain JavaScript, no build step, nothing loaded from elsewhere.
// Every picture comes from the demo's JSON API as a PNG data URL at the model's resolution.
"use strict";

const $ = (id) => document.getElementById(id);
const SCALE = 7;              // canvas pixels per model pixel on the drawing and mask pads
// An empty picture (a transparent pixel): an image waiting for its first answer shows its grey box
const BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";
let info;                     // GET /api/info: shape [C,H,W], class names, limits, paths, masks, methods

document.querySelectorAll("img.pixels").forEach((img) => { img.src = BLANK; });

async function api(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  let data;
  try {
    data = await response.json();
  } catch {
    throw new Error(`${path}: ${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(data.error || `${path}: ${response.status}`);
  return data;
}

// Runs `task`, showing its error (or nothing) on the panel's error line.
async function guarded(errorId, task) {
  try {
    await task();
    $(errorId).textContent = "";
  } catch (e) {
    $(errorId).textContent = e.message;
  }
}

// Runs a heavy request's `task` with the panel's `buttons` disabled and its status line counting
// the seconds, so a click during a long fill neither queues another nor looks ignored.
async function busy(buttons, statusId, task) {
  const started = performance.now();
  const status = $(statusId);
  const tick = () => { status.textContent = `working… ${((performance.now() - started) / 1000).toFixed(1)} s`; };
  buttons.forEach((b) => { b.disabled = true; });
  tick();
  const timer = setInterval(tick, 100);
  try {
    await task();
  } finally {
    clearInterval(timer);
    status.textContent = "";
    buttons.forEach((b) => { b.disabled = false; });
  }
}

// The requests of a control that fires often (a slider, a stroke, a pointer over the map): one at a
// time, and a body sent while one runs waits, replaced by any newer one, so the picture follows
// the control without a backlog. show(data) gets each answer still wanted; reset() drops the
// waiting body and the running one's answer (the panel moved on to another image, or was cleared).
// send() returns a promise that settles when no request is left to run.
function latestOnly(path, show, errorId) {
  let generation = 0, running = false, waiting = null, drained = Promise.resolve();
  async function run(body) {
    running = true;
    const mine = generation;
    try {
      const data = await api(path, body);
      if (mine === generation) { show(data); $(errorId).textContent = ""; }
    } catch (e) {
      if (mine === generation) $(errorId).textContent = e.message;
    }
    running = false;
    if (waiting) { const next = waiting; waiting = null; await run(next); }
  }
  return {
    send(body) {
      if (running) waiting = body;
      else drained = run(body);
      return drained;
    },
    reset() { generation++; waiting = null; },
  };
}

const randomSeed = () => Math.floor(Math.random() * 2 ** 31);
const number = (id) => Number($(id).value);   // "" or junk -> 0 or NaN; the server says what is wrong
const blank = (...ids) => ids.forEach((id) => { $(id).src = BLANK; });

// -- prior samples -----------------------------------------------------------------------------
async function newSamples() {
  await busy([$("new-samples")], "samples-status", () => guarded("samples-error", async () => {
    const data = await api("/api/sample", {n: number("samples-n"), seed: randomSeed()});
    $("samples").src = data.image;
  }));
}

// -- latent sliders ----------------------------------------------------------------------------
let latent = null;            // {index, start: the code's values on the slider dimensions}
let latentTicket = 0;         // the newest loadLatent call; an older one's answer is dropped
const sliderDecodes = latestOnly("/api/traverse", (data) => { $("traverse-image").src = data.image; },
                                 "sliders-error");

// Loads a test image's code onto new sliders; on an error the panel shows the error and nothing
// else (no sliders, no pictures), never the previous image's.
async function loadLatent() {
  const ticket = ++latentTicket;
  const index = number("latent-index");
  sliderDecodes.reset();
  let data;
  try {
    data = await api("/api/latent", {index, k: number("latent-k")});
  } catch (e) {
    if (ticket !== latentTicket) return;
    latent = null;
    $("sliders").replaceChildren();
    blank("latent-original", "traverse-image");
    $("latent-label").textContent = "original";
    $("sliders-error").textContent = e.message;
    return;
  }
  if (ticket !== latentTicket) return;
  latent = {index, start: data.values};
  $("latent-original").src = data.image;
  $("latent-label").textContent = `original: ${data.class}`;
  $("sliders-error").textContent = "";
  const bound = info.limits.latent_value;
  $("sliders").replaceChildren(...data.dims.map((dim, i) => {
    const row = document.createElement("label");
    row.className = "slider";
    row.title = `KL ${data.kl[i].toFixed(2)} nats`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = `z${dim}`;
    const input = document.createElement("input");
    Object.assign(input, {type: "range", min: -bound, max: bound, step: 0.05, value: data.values[i]});
    input.dataset.dim = dim;
    const value = document.createElement("span");
    value.className = "value";
    const show = () => { value.textContent = Number(input.value).toFixed(2); };
    show();
    input.addEventListener("input", () => { show(); decodeSliders(); });
    row.append(name, input, value);
    return row;
  }));
  await decodeSliders();
}

function decodeSliders() {
  const inputs = [...$("sliders").querySelectorAll("input")];
  return sliderDecodes.send({index: latent.index, dims: inputs.map((s) => Number(s.dataset.dim)),
                      values: inputs.map((s) => Number(s.value))});
}

function resetSliders() {
  if (!latent) return;
  $("sliders").querySelectorAll("input").forEach((s, i) => {
    s.value = latent.start[i];
    s.dispatchEvent(new Event("input"));
  });
}

// -- latent map --------------------------------------------------------------------------------
let map;                      // {view: [xlo, xhi, ylo, yhi] the canvas shows, dots: the drawn scatter}
const MAP_SIDE = 560;         // canvas pixels a side (shown at half that, or less on a narrow screen)
const mapDecodes = latestOnly("/api/map-decode", (data) => { $("map-image").src = data.image; }, "map-error");

async function setupMap() {
  await guarded("map-error", async () => {
    const data = await api("/api/map");
    const canvas = $("map-canvas");
    Object.assign(canvas, {width: MAP_SIDE, height: MAP_SIDE});
    const xs = data.points.map((p) => p[0]), ys = data.points.map((p) => p[1]);
    const pad = (lo, hi) => { const m = 0.05 * (hi - lo || 1); return [lo - m, hi + m]; };
    const view = [...pad(Math.min(...xs), Math.max(...xs)), ...pad(Math.min(...ys), Math.max(...ys))];
    const context = canvas.getContext("2d");
    context.fillStyle = "white";
    context.fillRect(0, 0, MAP_SIDE, MAP_SIDE);
    data.points.forEach(([x, y], i) => {
      context.fillStyle = data.colours[data.labels[i]];
      const [px, py] = toCanvas(view, x, y);
      context.fillRect(px - 2, py - 2, 4, 4);
    });
    map = {view, dots: context.getImageData(0, 0, MAP_SIDE, MAP_SIDE)};
    $("map-hint").textContent = `The test set's codes on ${data.axes.join(" and ")}, coloured by label. ` +
      "Hover or click: the point under the pointer is decoded.";
    $("map-legend").replaceChildren(...data.class_names.map((name, label) => {
      const item = document.createElement("span");
      item.innerHTML = '<i class="dot"></i>';
      item.firstChild.style.background = data.colours[label];
      item.append(name);
      return item;
    }));
    const at = (e) => {
      const r = canvas.getBoundingClientRect();
      const [xlo, xhi, ylo, yhi] = map.view;
      return [xlo + (e.clientX - r.left) / r.width * (xhi - xlo), yhi - (e.clientY - r.top) / r.height * (yhi - ylo)];
    };
    const decodeAt = (e) => {
      const [x, y] = at(e);
      const limit = info.limits.map_value;
      const clamp = (v) => Math.max(-limit, Math.min(limit, v));
      mark(x, y);
      $("map-at").textContent = `(${x.toFixed(2)}, ${y.toFixed(2)})`;
      mapDecodes.send({x: clamp(x), y: clamp(y)});
    };
    canvas.addEventListener("pointermove", decodeAt);
    canvas.addEventListener("pointerdown", decodeAt);
  });
}

function toCanvas([xlo, xhi, ylo, yhi], x, y) {
  return [(x - xlo) / (xhi - xlo) * MAP_SIDE, (yhi - y) / (yhi - ylo) * MAP_SIDE];
}

// The scatter with a cross at the decoded point.
function mark(x, y) {
  const context = $("map-canvas").getContext("2d");
  context.putImageData(map.dots, 0, 0);
  const [px, py] = toCanvas(map.view, x, y);
  context.strokeStyle = "black";
  context.lineWidth = 2;
  context.beginPath();
  context.moveTo(px - 10, py); context.lineTo(px + 10, py);
  context.moveTo(px, py - 10); context.lineTo(px, py + 10);
  context.stroke();
}

// -- interpolation -----------------------------------------------------------------------------
async function interpolateNow() {
  await busy([$("interp-run")], "interp-status", () => guarded("interp-error", async () => {
    const data = await api("/api/interpolate", {a: number("interp-a"), b: number("interp-b"),
                                                steps: number("interp-steps"), path: $("interp-path").value});
    $("interp-frames").replaceChildren(...data.frames.map((src, i) => {
      const img = new Image();
      Object.assign(img, {src, className: "pixels", alt: i === 0 || i === data.frames.length - 1 ? "an original" :
                                                          `step ${i} of ${data.frames.length - 2}`});
      return img;
    }));
  }));
}

// -- drawing pads (pointer events: mouse, pen and touch alike) ---------------------------------
// Calls onStroke(from, to) in canvas pixels while a pointer is down, and onEnd() when it lifts.
function pad(canvas, onStroke, onEnd) {
  const [, h, w] = info.shape;
  canvas.width = w * SCALE;
  canvas.height = h * SCALE;
  let last = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = at(e);
    onStroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = at(e);
    onStroke(last, p);
    last = p;
  });
  const end = () => { if (last) { last = null; onEnd(); } };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  return canvas.getContext("2d");
}

// -- draw and reconstruct ----------------------------------------------------------------------
let drawing;
const reconstructions = latestOnly("/api/reconstruct", (data) => {
  $("draw-input").src = data.input;
  $("draw-output").src = data.image;
}, "draw-error");

// a fixed seed: the picture changes with the drawing, not with the draw of z
const reconstructNow = () => reconstructions.send({image: $("draw-canvas").toDataURL("image/png"), seed: 0});

function clearDrawing() {
  reconstructions.reset();
  drawing.fillStyle = "black";
  drawing.fillRect(0, 0, drawing.canvas.width, drawing.canvas.height);
  blank("draw-input", "draw-output");
  $("draw-error").textContent = "";
}

function setupDrawing() {
  drawing = pad($("draw-canvas"), (a, b) => {
    drawing.beginPath();
    drawing.moveTo(...a);
    drawing.lineTo(...b);
    drawing.stroke();
    reconstructNow();
  }, reconstructNow);
  clearDrawing();
  Object.assign(drawing, {strokeStyle: "white", lineWidth: 2.2 * SCALE, lineCap: "round", lineJoin: "round"});
  const names = info.class_names;
  const what = names.join("") === "0123456789" ? "a digit" : names.length > 1 ?
    `something like the training images (${names.join(", ")})` : "something like the training images";
  const [, h, w] = info.shape;
  $("draw-hint").textContent = `Draw ${what}. ` + (info.drawing === "mnist-digit" ?
    `As MNIST's digits were made, it is cropped to its ink, scaled to fit 20x20 and centred by its mass in ${h}x${w};` :
    `The whole pad is shrunk to ${h}x${w};`) + " then it is binarized, encoded and decoded.";
}

// -- inpainting --------------------------------------------------------------------------------
let mask;                     // Uint8Array [H*W], 1 = missing
let maskPad;                  // the mask canvas's 2-D context
let inpaintTicket = 0;        // bumped when the image changes: a fill still running for the old one is dropped
const inpaintBase = new Image();

function renderMask() {
  const [, h, w] = info.shape;
  maskPad.imageSmoothingEnabled = false;
  maskPad.clearRect(0, 0, maskPad.canvas.width, maskPad.canvas.height);
  if (inpaintBase.naturalWidth) maskPad.drawImage(inpaintBase, 0, 0, w * SCALE, h * SCALE);
  maskPad.fillStyle = "rgba(230, 50, 50, 0.65)";
  for (let i = 0; i < h * w; i++) {
    if (mask[i]) maskPad.fillRect((i % w) * SCALE, Math.floor(i / w) * SCALE, SCALE, SCALE);
  }
}

// The brush's radius in model pixels, held to the input's range (the box shows what is used).
function brushRadius() {
  const input = $("inpaint-brush");
  const r = Math.min(Number(input.max), Math.max(Number(input.min), Math.round(Number(input.value)) || 1));
  if (Number(input.value) !== r) input.value = r;
  return r;
}

// Marks the cells within the brush's radius of each point along a -> b (in canvas pixels).
function paintMask(a, b) {
  const [, h, w] = info.shape;
  const r = brushRadius();
  const steps = Math.max(1, Math.ceil(Math.hypot(b[0] - a[0], b[1] - a[1]) / (SCALE / 2)));
  for (let s = 0; s <= steps; s++) {
    const cx = (a[0] + (b[0] - a[0]) * s / steps) / SCALE;
    const cy = (a[1] + (b[1] - a[1]) * s / steps) / SCALE;
    for (let y = Math.floor(cy - r); y <= cy + r; y++) {
      for (let x = Math.floor(cx - r); x <= cx + r; x++) {
        if (x >= 0 && y >= 0 && x < w && y < h && (x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 < r * r) mask[y * w + x] = 1;
      }
    }
  }
  renderMask();
}

// The mask as a PNG of the model's size, white = missing (the API's convention).
function maskDataUrl() {
  const [, h, w] = info.shape;
  const canvas = document.createElement("canvas");
  Object.assign(canvas, {width: w, height: h});
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(w, h);
  mask.forEach((m, i) => { pixels.data.fill(m ? 255 : 0, 4 * i, 4 * i + 3); pixels.data[4 * i + 3] = 255; });
  context.putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png");
}

// Loads a mask PNG (white = missing) from the server into the brush's mask.
async function loadMask(url) {
  const [, h, w] = info.shape;
  const img = new Image();
  img.src = url;
  await img.decode();
  const canvas = document.createElement("canvas");
  Object.assign(canvas, {width: w, height: h});
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, w, h).data;
  mask = mask.map((_, i) => (data[4 * i] >= 128 ? 1 : 0));
  renderMask();
}

// Shows test image `inpaint-index` under the mask; the previous image's fill goes with it.
async function loadInpaintImage() {
  inpaintTicket++;
  blank("inpaint-input", "inpaint-output");
  $("inpaint-note").textContent = "";
  await guarded("inpaint-error", async () => {
    const data = await api("/api/test-image", {index: number("inpaint-index")});
    inpaintBase.src = data.image;
    await inpaintBase.decode();
    renderMask();
  });
}

// Fills the painted mask, or a named region (which then becomes the painted mask).
async function inpaintNow(region) {
  const buttons = [$("inpaint-run"), ...$("inpaint-presets").children];
  const ticket = inpaintTicket;
  const steps = number("inpaint-steps");
  await busy(buttons, "inpaint-status", () => guarded("inpaint-error", async () => {
    const data = await api("/api/inpaint", {index: number("inpaint-index"), mask: region || maskDataUrl(),
                                            steps, chains: number("inpaint-chains"),
                                            method: $("inpaint-method").value, seed: randomSeed()});
    if (ticket !== inpaintTicket) return;
    $("inpaint-input").src = data.input;
    $("inpaint-output").src = data.image;
    $("inpaint-note").textContent = data.steps_done < steps ? `stopped after ${data.steps_done} of ${steps} ` +
      `steps: the demo gives a request at most ${info.work_seconds} s` : "";
    if (region) await loadMask(data.mask);
  }));
}

function setupInpaint() {
  const [, h, w] = info.shape;
  mask = new Uint8Array(h * w);
  maskPad = pad($("mask-canvas"), paintMask, () => {});
  $("inpaint-presets").replaceChildren(...info.masks.map((region) => {
    const button = document.createElement("button");
    button.textContent = region;
    button.title = `fill the ${region} region`;
    button.addEventListener("click", () => inpaintNow(region));
    return button;
  }));
}

// -- start -------------------------------------------------------------------------------------
function options(select, values) {
  select.replaceChildren(...values.map((v) => new Option(v, v)));
}

async function main() {
  info = await api("/api/info");
  const [c, h, w] = info.shape;
  const vq = info.family === "vq";   // discrete codes: no sliders, no map (the server refuses them too)
  $("about").textContent = (vq ? `A VQ-VAE with a ${info.grid}x${info.grid} grid of codes from a codebook of ` +
    `${info.codebook_size} on ` : `A variational autoencoder with ${info.latent_dim} latent dimensions on `) +
    `${c}x${h}x${w} images; test images 0..${info.test_size - 1}.`;
  if (vq) {
    $("sliders-section").hidden = true;
    $("map-section").hidden = true;
    $("interp-hint").textContent = "Linear in the encoder's continuous output before quantisation, each point " +
      "quantised to codes and decoded (the codes jump), framed by the originals.";
  }
  for (const id of ["latent-index", "interp-a", "interp-b", "inpaint-index"]) $(id).max = info.test_size - 1;
  $("samples-n").max = info.limits.samples;
  $("latent-k").max = Math.min(info.limits.dims, info.latent_dim);
  $("interp-steps").max = info.limits.interpolation_steps;
  $("inpaint-steps").max = info.limits.inpaint_steps;
  $("inpaint-chains").max = info.limits.chains;
  options($("interp-path"), info.paths);
  options($("inpaint-method"), info.methods);
  setupDrawing();
  setupInpaint();

  $("new-samples").addEventListener("click", newSamples);
  $("latent-index").addEventListener("change", loadLatent);
  $("latent-k").addEventListener("change", loadLatent);
  $("sliders-reset").addEventListener("click", resetSliders);
  $("interp-run").addEventListener("click", interpolateNow);
  $("draw-clear").addEventListener("click", clearDrawing);
  $("inpaint-index").addEventListener("change", loadInpaintImage);
  $("inpaint-brush").addEventListener("change", brushRadius);
  $("inpaint-clear").addEventListener("click", () => { mask.fill(0); renderMask(); });
  $("inpaint-run").addEventListener("click", () => inpaintNow());
  await Promise.all([newSamples(), ...(vq ? [] : [loadLatent(), setupMap()]), interpolateNow(), loadInpaintImage()]);
  document.body.dataset.ready = "true";   // everything drawn once (the browser tests wait for it)
}

main().catch((e) => { $("fatal").textContent = `The demo could not start: ${e.message}`; });
