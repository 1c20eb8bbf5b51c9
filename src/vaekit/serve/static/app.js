// The vaekit demo page: plain JavaScript, no build step, nothing loaded from elsewhere.
// Every picture comes from the demo's JSON API as a PNG data URL at the model's resolution.
"use strict";

const $ = (id) => document.getElementById(id);
const SCALE = 7;              // canvas pixels per model pixel on the drawing and mask pads
let info;                     // GET /api/info: shape [C,H,W], limits, paths, masks, methods

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

function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// Wraps an API call so that only the newest call's answer is used (null for the older ones):
// a slow answer must not overwrite the picture of a later slider position or stroke.
function newestOnly(call) {
  let ticket = 0;
  return async (body) => {
    const mine = ++ticket;
    const data = await call(body);
    return mine === ticket ? data : null;
  };
}

const randomSeed = () => Math.floor(Math.random() * 2 ** 31);
const number = (id) => Number($(id).value);   // "" or junk -> 0 or NaN; the server says what is wrong

// -- prior samples -----------------------------------------------------------------------------
async function newSamples() {
  await guarded("samples-error", async () => {
    const data = await api("/api/sample", {n: number("samples-n"), seed: randomSeed()});
    $("samples").src = data.image;
  });
}

// -- latent sliders ----------------------------------------------------------------------------
let latent = null;            // {index, start: the code's values on the slider dimensions}
const traverseNewest = newestOnly((body) => api("/api/traverse", body));

async function loadLatent() {
  await guarded("sliders-error", async () => {
    const index = number("latent-index");
    const data = await api("/api/latent", {index, k: number("latent-k")});
    latent = {index, start: data.values};
    $("latent-original").src = data.image;
    $("latent-label").textContent = `original (label ${data.label})`;
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
      input.addEventListener("input", () => { show(); decodeSoon(); });
      row.append(name, input, value);
      return row;
    }));
  });
  await decodeSliders();
}

async function decodeSliders() {
  if (!latent) return;
  await guarded("sliders-error", async () => {
    const inputs = [...$("sliders").querySelectorAll("input")];
    const data = await traverseNewest({index: latent.index, dims: inputs.map((s) => Number(s.dataset.dim)),
                                       values: inputs.map((s) => Number(s.value))});
    if (data) $("traverse-image").src = data.image;
  });
}
const decodeSoon = debounce(decodeSliders, 40);

function resetSliders() {
  $("sliders").querySelectorAll("input").forEach((s, i) => {
    s.value = latent.start[i];
    s.dispatchEvent(new Event("input"));
  });
}

// -- interpolation -----------------------------------------------------------------------------
async function interpolateNow() {
  await guarded("interp-error", async () => {
    const data = await api("/api/interpolate", {a: number("interp-a"), b: number("interp-b"),
                                                steps: number("interp-steps"), path: $("interp-path").value});
    $("interp-image").src = data.image;
  });
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
const reconstructNewest = newestOnly((body) => api("/api/reconstruct", body));
let drawing;

async function reconstructNow() {
  await guarded("draw-error", async () => {
    // a fixed seed: the picture changes with the drawing, not with the draw of z
    const data = await reconstructNewest({image: $("draw-canvas").toDataURL("image/png"), seed: 0});
    if (data) {
      $("draw-input").src = data.input;
      $("draw-output").src = data.image;
    }
  });
}
const reconstructSoon = debounce(reconstructNow, 150);

function clearDrawing() {
  drawing.fillStyle = "black";
  drawing.fillRect(0, 0, drawing.canvas.width, drawing.canvas.height);
  $("draw-input").removeAttribute("src");
  $("draw-output").removeAttribute("src");
}

function setupDrawing() {
  drawing = pad($("draw-canvas"), (a, b) => {
    drawing.beginPath();
    drawing.moveTo(...a);
    drawing.lineTo(...b);
    drawing.stroke();
    reconstructSoon();
  }, reconstructNow);
  clearDrawing();
  Object.assign(drawing, {strokeStyle: "white", lineWidth: 2.2 * SCALE, lineCap: "round", lineJoin: "round"});
}

// -- inpainting --------------------------------------------------------------------------------
let mask;                     // Uint8Array [H*W], 1 = missing
let maskPad;                  // the mask canvas's 2-D context
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

// Marks the cells within the brush's radius of each point along a -> b (in canvas pixels).
function paintMask(a, b) {
  const [, h, w] = info.shape;
  const r = Math.max(1, number("inpaint-brush"));
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

// The mask as a PNG of the model's size, white = missing.
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

async function loadInpaintImage() {
  await guarded("inpaint-error", async () => {
    const data = await api("/api/test-image", {index: number("inpaint-index")});
    inpaintBase.src = data.image;
    await inpaintBase.decode();
    renderMask();
  });
}

// Fills the painted mask, or a named region (which then becomes the painted mask).
async function inpaintNow(region) {
  await guarded("inpaint-error", async () => {
    const data = await api("/api/inpaint", {index: number("inpaint-index"), mask: region || maskDataUrl(),
                                            steps: number("inpaint-steps"), chains: number("inpaint-chains"),
                                            method: $("inpaint-method").value, seed: randomSeed()});
    $("inpaint-input").src = data.input;
    $("inpaint-output").src = data.image;
    if (region) await loadMask(data.mask);
  });
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
  $("about").textContent = `A variational autoencoder with ${info.latent_dim} latent dimensions on ` +
    `${c}x${h}x${w} images; test images 0..${info.test_size - 1}.`;
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
  $("inpaint-clear").addEventListener("click", () => { mask.fill(0); renderMask(); });
  $("inpaint-run").addEventListener("click", () => inpaintNow());
  await Promise.all([newSamples(), loadLatent(), interpolateNow(), loadInpaintImage()]);
  document.body.dataset.ready = "true";   // everything drawn once (the browser tests wait for it)
}

main().catch((e) => { $("fatal").textContent = `The demo could not start: ${e.message}`; });
