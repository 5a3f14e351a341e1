// finesam serve: the page. Plain JavaScript, no build step, nothing fetched but this server's API.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const COLOURS = [[230, 57, 70], [42, 157, 143], [69, 123, 157], [244, 162, 97], [131, 56, 236],
                 [255, 190, 11], [58, 134, 255], [251, 86, 7], [6, 214, 160], [239, 71, 111]];

const state = {
  image: null,       // {id, width, height, name}
  objects: [],       // {points, labels, box, name, score, results: {main, hq}} ; a result: {masks: [{rle, score, bits}], chosen, ms}
                     // (name and score: a detection of the text prompt; null for objects made by clicks)
  current: -1,
  history: [], future: [],
  everything: [],    // bit masks of "segment everything"
  busy: 0,
  model: null,
};
window.finesam = state; // for people poking at it in the console, and for the browser test

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch("api/" + path, Object.assign({}, options, { headers }));
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function status(text) { $("status").textContent = text; }

// -- COCO RLE (string counts, column-major), as pycocotools writes it --------------------------------------
function decodeCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

function rleToBits(rle) {
  const [height, width] = rle.size;
  const bits = new Uint8Array(width * height);
  let index = 0, value = 0;
  for (const count of decodeCounts(rle.counts)) {
    if (value) for (let i = index; i < index + count; i++) bits[(i % height) * width + Math.floor(i / height)] = 1;
    index += count; value = 1 - value;
  }
  return bits;
}

// -- state and history ---------------------------------------------------------------------------------------
function prompts() {
  const saved = (o) => ({ points: o.points, labels: o.labels, box: o.box, name: o.name, score: o.score });
  return { objects: state.objects.map(saved), current: state.current };
}

function remember() { state.history.push(JSON.stringify(prompts())); state.future = []; }

function restore(snapshot) {
  const saved = JSON.parse(snapshot);
  state.objects = saved.objects.map((o) => Object.assign(o, { results: {} }));
  state.current = saved.current;
  refresh();
}

function undo() { if (state.history.length) { state.future.push(JSON.stringify(prompts())); restore(state.history.pop()); } }
function redo() { if (state.future.length) { state.history.push(JSON.stringify(prompts())); restore(state.future.pop()); } }

function currentObject() {
  if (state.current < 0) newObject(false);
  return state.objects[state.current];
}

function newObject(record = true) {
  if (record) remember();
  state.objects.push({ points: [], labels: [], box: null, name: null, score: null, results: {} });
  state.current = state.objects.length - 1;
  drawAll();
}

function clearAll() {
  remember();
  state.objects = []; state.current = -1; state.everything = [];
  drawAll();
}

// -- asking the server ---------------------------------------------------------------------------------------
function setup() {
  const loras = [...document.querySelectorAll("#loras input:checked")].map((input) => input.value);
  return { multimask: $("multimask").checked, hq_only: $("hq-only").checked, loras };
}

function views() {
  if ($("compare").checked) return [["main", false], ["hq", true]];
  return [["main", $("hq").checked]];
}

async function segment(object) {
  if (!object.points.length && !object.box) { object.results = {}; return; }
  for (const [view, hq] of views()) {
    const body = Object.assign(setup(), { hq, box: object.box });
    if (object.points.length) Object.assign(body, { points: object.points, labels: object.labels });
    if (!state.image.encoded) status("encoding the image...");
    const answer = await api(`images/${state.image.id}/masks`, { method: "POST", body: JSON.stringify(body) });
    if (answer.encode_ms) state.image.encoded = answer.encode_ms;
    answer.masks.forEach((mask) => { mask.bits = rleToBits(mask.rle); });
    const best = answer.masks.reduce((b, m, i, all) => (m.score > all[b].score ? i : b), 0);
    object.results[view] = { masks: answer.masks, chosen: best, ms: answer.ms, hq, request: body };
  }
}

async function refresh() {
  if (!state.image) return;
  state.busy++;
  try {
    for (const object of state.objects) await segment(object);
    const timing = views().map(([view, hq]) => {
      const times = state.objects.map((o) => o.results[view]).filter(Boolean).map((r) => r.ms);
      return `${hq ? "HQ-SAM" : "SAM"} ${times.length ? times[times.length - 1].toFixed(1) + " ms" : "-"}`;
    });
    const encoded = state.image.encoded ? `; encoded in ${(state.image.encoded / 1000).toFixed(2)} s` : "";
    status(`${state.objects.length} object(s); last prompt: ${timing.join(", ")}${encoded}`);
  } catch (error) {
    status("error: " + error.message);
  } finally {
    state.busy--;
  }
  drawAll();
}

// the boxes the server's detector finds for the phrases, each added as an object (its mask asked for like any box)
async function detect() {
  if (!state.image) return;
  const text = $("text").value.trim();
  if (!text) { status("type what to find, e.g. a dog. a cat."); return; }
  const body = { text };
  if ($("box-threshold").value !== "") body.box_threshold = Number($("box-threshold").value);
  state.busy++;
  try {
    status(`finding ${text}...`);
    const answer = await api(`images/${state.image.id}/detections`, { method: "POST", body: JSON.stringify(body) });
    if (!answer.detections.length) {
      status(`nothing found for "${text}" (${(answer.ms / 1000).toFixed(2)} s): try a lower box threshold`);
      return;
    }
    remember();
    for (const d of answer.detections) {
      state.objects.push({ points: [], labels: [], box: d.box, name: d.label, score: d.score, results: {} });
    }
    state.current = -1;  // a click starts a new object; pick a detection in the list to edit it
    status(`${answer.detections.length} found in ${(answer.ms / 1000).toFixed(2)} s; segmenting...`);
  } catch (error) {
    status("error: " + error.message);
    return;
  } finally {
    state.busy--;
  }
  await refresh();
}

async function everything() {
  if (!state.image) return;
  const started = Date.now();
  const timer = setInterval(() => status(`segmenting everything... ${((Date.now() - started) / 1000).toFixed(0)} s`), 250);
  try {
    const body = Object.assign(setup(), { hq: $("hq").checked, points_per_side: Number($("points-per-side").value) });
    delete body.multimask;
    const answer = await api(`images/${state.image.id}/everything`, { method: "POST", body: JSON.stringify(body) });
    remember();
    state.everything = answer.annotations.map((a) => rleToBits(a.segmentation));
    status(`${answer.annotations.length} masks in ${(answer.ms / 1000).toFixed(1)} s`);
  } catch (error) {
    status("error: " + error.message);
  } finally {
    clearInterval(timer);
  }
  drawAll();
}

// -- drawing -------------------------------------------------------------------------------------------------
function chosenBits(object, view) {
  const result = object.results[view];
  return result ? result.masks[result.chosen].bits : null;
}

function paint(data, bits, colour, alpha, width, height, contours) {
  for (let i = 0; i < bits.length; i++) {
    if (!bits[i]) continue;
    const x = i % width, y = (i - x) / width;
    const edge = contours && (x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
      !bits[i - 1] || !bits[i + 1] || !bits[i - width] || !bits[i + width]);
    const a = edge ? 255 : alpha;
    const j = 4 * i;
    data[j] = colour[0]; data[j + 1] = colour[1]; data[j + 2] = colour[2]; data[j + 3] = Math.max(a, 1);
  }
}

function drawView(view) {
  const image = state.image, canvas = $("overlay-" + view), marks = $("prompts-" + view);
  if (!image) return;
  for (const c of [canvas, marks]) { c.width = image.width; c.height = image.height; }
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(image.width, image.height);
  const alpha = Math.round(2.55 * Number($("opacity").value)), contours = $("contours").checked;
  state.everything.forEach((bits, i) => paint(pixels.data, bits, COLOURS[i % COLOURS.length], alpha, image.width, image.height, contours));
  state.objects.forEach((object, i) => {
    const bits = chosenBits(object, view);
    if (bits) paint(pixels.data, bits, COLOURS[i % COLOURS.length], alpha, image.width, image.height, contours);
  });
  context.putImageData(pixels, 0, 0);
  const pen = marks.getContext("2d"), unit = Math.max(image.width, image.height) / 400;
  state.objects.forEach((object, i) => {
    if (object.box) {
      pen.strokeStyle = `rgb(${COLOURS[i % COLOURS.length].join(",")})`;
      pen.lineWidth = 2 * unit;
      const [x1, y1, x2, y2] = object.box;
      pen.strokeRect(x1, y1, x2 - x1, y2 - y1);
      if (object.name) {
        pen.font = `${Math.round(12 * unit)}px sans-serif`;
        pen.fillStyle = pen.strokeStyle;
        pen.fillText(`${object.name} ${object.score.toFixed(2)}`, x1 + 3 * unit, y1 + 14 * unit);
      }
    }
    object.points.forEach(([x, y], j) => {
      pen.fillStyle = object.labels[j] ? "#22c55e" : "#ef4444";
      pen.strokeStyle = "#fff"; pen.lineWidth = unit;
      pen.beginPath(); pen.arc(x, y, 4 * unit, 0, 2 * Math.PI); pen.fill(); pen.stroke();
    });
  });
  if (drag && drag.view === view && drag.moved) {
    pen.setLineDash([6 * unit, 4 * unit]); pen.strokeStyle = "#fff"; pen.lineWidth = 2 * unit;
    pen.strokeRect(drag.x, drag.y, drag.x2 - drag.x, drag.y2 - drag.y);
  }
  const last = state.objects.map((o) => o.results[view]).filter(Boolean).pop();
  const name = view === "hq" || ($("hq").checked && !$("compare").checked) ? "HQ-SAM" : "SAM";
  $("caption-" + view).textContent = last ? `${name}: ${last.ms.toFixed(1)} ms` : name;
}

function drawAll() {
  $("view-hq").hidden = !$("compare").checked;
  drawView("main");
  if ($("compare").checked) drawView("hq");
  const list = $("objects");
  list.innerHTML = "";
  state.objects.forEach((object, i) => {
    const item = document.createElement("li");
    const result = object.results.main;
    item.innerHTML = `<span class="swatch" style="background: rgb(${COLOURS[i % COLOURS.length].join(",")})"></span>` +
      (object.name ? `${escaped(object.name)} ${object.score.toFixed(2)}` : `object ${i + 1}`) +
      (result ? ` (IoU ${result.masks[result.chosen].score.toFixed(3)})` : "");
    item.className = i === state.current ? "current" : "";
    item.onclick = () => { state.current = i; drawAll(); };
    list.appendChild(item);
  });
  drawCandidates();
}

function escaped(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function drawCandidates() {
  const box = $("candidates");
  box.innerHTML = "";
  const object = state.objects[state.current];
  const result = object && object.results.main;
  if (!result || result.masks.length < 2) return;
  result.masks.forEach((mask, i) => {
    const canvas = document.createElement("canvas");
    canvas.width = state.image.width; canvas.height = state.image.height;
    const context = canvas.getContext("2d"), pixels = context.createImageData(canvas.width, canvas.height);
    paint(pixels.data, mask.bits, [255, 255, 255], 255, canvas.width, canvas.height, false);
    context.putImageData(pixels, 0, 0);
    const thumb = document.createElement("img");
    thumb.src = canvas.toDataURL();
    thumb.title = `candidate ${i + 1}: predicted IoU ${mask.score.toFixed(3)}`;
    thumb.className = i === result.chosen ? "chosen" : "";
    thumb.onclick = () => choose(i);
    box.appendChild(thumb);
  });
}

function choose(i) {
  const object = state.objects[state.current];
  for (const result of Object.values((object && object.results) || {})) if (i < result.masks.length) result.chosen = i;
  drawAll();
}

// -- mouse ---------------------------------------------------------------------------------------------------
let drag = null;

function imagePoint(event, canvas) {
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * state.image.width;
  const y = ((event.clientY - rect.top) / rect.height) * state.image.height;
  return [Math.min(Math.max(x, 0), state.image.width - 1), Math.min(Math.max(y, 0), state.image.height - 1)];
}

for (const view of ["main", "hq"]) {
  const canvas = $("prompts-" + view);
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  canvas.addEventListener("mousedown", (event) => {
    if (!state.image) return;
    const [x, y] = imagePoint(event, canvas);
    drag = { view, x, y, x2: x, y2: y, moved: false, background: event.button === 2 || event.shiftKey, screen: [event.clientX, event.clientY] };
  });
  canvas.addEventListener("mousemove", (event) => {
    if (!drag) return;
    [drag.x2, drag.y2] = imagePoint(event, canvas);
    drag.moved = drag.moved || Math.hypot(event.clientX - drag.screen[0], event.clientY - drag.screen[1]) > 5;
    if (drag.moved) drawView(view);
  });
  canvas.addEventListener("mouseup", () => {
    if (!drag) return;
    const done = drag;
    drag = null;
    remember();
    const object = currentObject();
    if (done.moved) {
      object.box = [Math.min(done.x, done.x2), Math.min(done.y, done.y2), Math.max(done.x, done.x2), Math.max(done.y, done.y2)]
        .map((v) => Math.round(v * 10) / 10);
    } else {
      object.points.push([Math.round(done.x * 10) / 10, Math.round(done.y * 10) / 10]);
      object.labels.push(done.background ? 0 : 1);
    }
    refresh();
  });
}

// -- images --------------------------------------------------------------------------------------------------
async function show(answer, name) {
  state.image = Object.assign(answer, { name, encoded: 0 });
  state.objects = []; state.current = -1; state.history = []; state.future = []; state.everything = [];
  const response = await fetch(`api/images/${answer.id}`, { headers: token ? { Authorization: "Bearer " + token } : {} });
  const url = URL.createObjectURL(await response.blob());
  await Promise.all(["main", "hq"].map((view) => new Promise((resolve) => {
    const img = $("image-" + view);
    img.onload = resolve; img.src = url;
  })));
  drawAll();
  status(`${name}: ${answer.width} x ${answer.height}; click a point or drag a box`);
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  status(`uploading ${file.name}...`);
  try {
    await show(await api("images", { method: "POST", body: form }), file.name);
  } catch (error) {
    status("error: " + error.message);
  }
}

$("file").addEventListener("change", (event) => { if (event.target.files[0]) upload(event.target.files[0]); });
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  if (event.dataTransfer.files[0]) upload(event.dataTransfer.files[0]);
});
$("library").addEventListener("change", async (event) => {
  const name = event.target.value;
  if (!name) return;
  try {
    await show(await api(`library/${encodeURIComponent(name)}`, { method: "POST" }), name);
  } catch (error) {
    status("error: " + error.message);
  }
});

// -- export --------------------------------------------------------------------------------------------------
function save(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob); link.download = name;
  document.body.appendChild(link); link.click(); link.remove();
}

function stem() { return (state.image.name || "image").replace(/\.[^.]*$/, ""); }

function exportPng() {
  state.objects.forEach((object, i) => {
    const bits = chosenBits(object, "main");
    if (!bits) return;
    const canvas = document.createElement("canvas");
    canvas.width = state.image.width; canvas.height = state.image.height;
    const context = canvas.getContext("2d"), pixels = context.createImageData(canvas.width, canvas.height);
    for (let p = 0; p < bits.length; p++) {
      const v = bits[p] ? 255 : 0;
      pixels.data.set([v, v, v, 255], 4 * p);
    }
    context.putImageData(pixels, 0, 0);
    canvas.toBlob((blob) => save(blob, `${stem()}_object_${i + 1}.png`), "image/png");
  });
}

function boxOf(bits, width) {
  let x1 = Infinity, y1 = Infinity, x2 = -1, y2 = -1, area = 0;
  for (let i = 0; i < bits.length; i++) {
    if (!bits[i]) continue;
    const x = i % width, y = (i - x) / width;
    area++; x1 = Math.min(x1, x); y1 = Math.min(y1, y); x2 = Math.max(x2, x); y2 = Math.max(y2, y);
  }
  return area ? { area, bbox: [x1, y1, x2 - x1 + 1, y2 - y1 + 1] } : { area: 0, bbox: [0, 0, 0, 0] };
}

// outer boundaries of each 8-connected region, traced along pixel centres (Moore neighbours)
function polygons(bits, width, height) {
  const seen = new Uint8Array(bits.length), found = [];
  const steps = [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]];
  const on = (x, y) => x >= 0 && y >= 0 && x < width && y < height && bits[y * width + x];
  for (let start = 0; start < bits.length; start++) {
    if (!bits[start] || seen[start] || (start % width && bits[start - 1])) continue;
    const stack = [start]; seen[start] = 1;  // mark the region so that it is traced once
    while (stack.length) {
      const p = stack.pop(), x = p % width, y = (p - x) / width;
      for (const [dx, dy] of steps) {
        const q = (y + dy) * width + x + dx;
        if (on(x + dx, y + dy) && !seen[q]) { seen[q] = 1; stack.push(q); }
      }
    }
    const sx = start % width, sy = (start - sx) / width, ring = [sx, sy];
    let x = sx, y = sy, direction = 6;
    for (let guard = 0; guard < 4 * bits.length; guard++) {
      let moved = false;
      for (let k = 0; k < 8; k++) {
        const d = (direction + 6 + k) % 8, nx = x + steps[d][0], ny = y + steps[d][1];
        if (on(nx, ny)) { x = nx; y = ny; direction = d; moved = true; break; }
      }
      if (!moved || (x === sx && y === sy)) break;
      ring.push(x, y);
    }
    if (ring.length >= 6) found.push(ring);
  }
  return found;
}

function exportCoco(withPolygons) {
  const width = state.image.width, height = state.image.height, annotations = [];
  const names = [...new Set(state.objects.map((o) => o.name || "object"))];  // categories: the phrases found
  state.objects.forEach((object, i) => {
    const result = object.results.main;
    if (!result) return;
    const mask = result.masks[result.chosen];
    const category = names.indexOf(object.name || "object") + 1;
    const annotation = Object.assign({ id: i + 1, image_id: 1, category_id: category, score: mask.score }, boxOf(mask.bits, width));
    if (object.name) annotation.detection_score = object.score;
    annotation.segmentation = withPolygons ? polygons(mask.bits, width, height) : mask.rle;
    annotations.push(annotation);
  });
  const coco = {
    images: [{ id: 1, file_name: state.image.name, width, height }],
    categories: names.map((name, i) => ({ id: i + 1, name })),
    annotations,
  };
  save(new Blob([JSON.stringify(coco)], { type: "application/json" }), `${stem()}_${withPolygons ? "polygons" : "coco"}.json`);
}

$("export-png").onclick = exportPng;
$("export-coco").onclick = () => exportCoco(false);
$("export-polygons").onclick = () => exportCoco(true);

// -- controls and keys ---------------------------------------------------------------------------------------
$("new-object").onclick = () => newObject();
$("undo").onclick = undo;
$("redo").onclick = redo;
$("clear").onclick = clearAll;
$("everything").onclick = everything;
$("detect").onclick = detect;
$("text").addEventListener("keydown", (event) => { if (event.key === "Enter") detect(); });
for (const id of ["hq", "hq-only", "compare", "multimask"]) $(id).addEventListener("change", refresh);
for (const id of ["opacity", "contours"]) $(id).addEventListener("input", drawAll);

function toggle(id) { const box = $(id); if (!box.disabled) { box.checked = !box.checked; box.dispatchEvent(new Event("change")); } }

document.addEventListener("keydown", (event) => {
  if (event.target.tagName === "INPUT" && event.target.type !== "checkbox") return;
  const key = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey) && key === "z") { event.preventDefault(); event.shiftKey ? redo() : undo(); }
  else if ((event.ctrlKey || event.metaKey) && key === "y") { event.preventDefault(); redo(); }
  else if (key === "n") newObject();
  else if (key === "c") clearAll();
  else if (key === "h") toggle("hq");
  else if (key === "v") toggle("compare");
  else if (key === "m") toggle("multimask");
  else if (key === "e") everything();
  else if (key === "o") { $("contours").checked = !$("contours").checked; drawAll(); }
  else if (["1", "2", "3"].includes(key)) choose(Number(key) - 1);
});

async function start() {
  try {
    const model = await api("model");
    state.model = model;
    $("model").textContent = model.model + (model.adapters.hq ? " + HQ-SAM adapter" : "");
    for (const id of ["hq", "hq-only", "compare"]) $(id).disabled = !model.adapters.hq;
    for (const id of ["text", "box-threshold", "detect"]) $(id).disabled = !model.detector;
    $("text-hint").textContent = model.detector
      ? `${model.detector} finds the boxes; each becomes an object: click it in the list to edit it`
      : "this server has no text detector: start it with --detector (pip install 'finesam[text]')";
    for (const name of model.adapters.loras) {
      const label = document.createElement("label");
      label.innerHTML = `<input type="checkbox" value="${name.replace(/[^\w.-]/g, "")}"> LoRA ${name.replace(/[^\w.-]/g, "")}`;
      label.querySelector("input").addEventListener("change", refresh);
      $("loras").appendChild(label);
    }
    const listing = await api("library");
    if (listing.images.length) {
      $("library").hidden = false;
      for (const name of listing.images) $("library").appendChild(new Option(name, name));
    }
  } catch (error) {
    status("error: " + error.message);
  }
}
start();
