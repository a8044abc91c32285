// clipmask's try-it page: plain JavaScript over the public API (no build step, no framework).
// The key stays in this browser's local storage; every call goes to /v1 on this same server.
'use strict';

const KEY = 'clipmask.apiKey';
const FINAL = new Set(['succeeded', 'failed', 'canceled']);
const $ = (id) => document.getElementById(id);

// The API's stable codes, in plain words; anything else shows the problem's own detail.
const PLAIN = {
  unauthorized: 'Your API key was not accepted. Check that you pasted it whole, or ask your operator for a new one.',
  rate_limited: 'Too many requests just now. Wait a few seconds and try again.',
  too_many_queued_jobs: 'You have too many jobs waiting. Wait for some to finish, then try again.',
  payload_too_large: 'That image is too large to upload.',
  unsupported_image_type: 'That file is not an image the service reads (JPEG, PNG or WebP).',
  missing_image: 'Choose an image first: drop one, pick a file, or paste a URL.',
  invalid_prompts: 'Type at least one prompt, or choose a preset.',
  unknown_preset: 'That preset does not exist (any more).',
  unknown_model: 'That model does not exist (any more).',
  invalid_refine: 'Edges must be none, guided or matting.',
  model_not_found: 'That model was deleted after the job was made.',
  dependency_unavailable: 'The service is having trouble reaching its database or storage. Try again shortly.',
  image_fetch_failed: 'The service could not download the image from that URL.',
  image_invalid: 'The image could not be decoded.',
  image_too_large: 'The image has too many pixels.',
};

function apiKey() { return localStorage.getItem(KEY) || ''; }

function showKeyState() {
  const key = apiKey();
  $('key-state').textContent = key
    ? `Key saved in this browser (ends …${key.slice(-4)}).`
    : 'No key yet. It is kept in this browser only (local storage).';
}

function setStatus(text, busy) {
  $('status').textContent = text;
  $('spinner').hidden = !busy;
}

function showProblem(message) {
  const box = $('problem');
  box.textContent = message;
  box.hidden = !message;
}

class ApiError extends Error {
  constructor(status, problem) {
    const plain = PLAIN[problem.code];
    const fields = (problem.errors || []).map((e) => `${e.field}: ${e.message}`).join('; ');
    super(plain || problem.detail || problem.title || `The server answered ${status}.`);
    this.status = status;
    this.code = problem.code;
    this.fields = fields;
  }
}

async function api(method, path, { body, wait } = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  if (wait) headers.Prefer = `wait=${wait}`;
  if (body && !(body instanceof FormData)) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body });
  } catch (err) {
    throw new ApiError(0, { detail: 'The server could not be reached. Is it running?' });
  }
  const text = await resp.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (err) { data = { detail: text.slice(0, 200) }; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

async function loadPresets() {
  const select = $('preset');
  const chosen = select.value;
  if (!apiKey()) return;
  try {
    const found = [];
    let cursor = null;
    do {  // every page: built-ins, then the tenant's own
      const list = await api('GET', `/v1/presets?limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
      found.push(...list.data);
      cursor = list.next_cursor;
    } while (cursor);
    select.length = 1;
    for (const preset of found) {
      const opt = document.createElement('option');
      opt.value = preset.id;
      opt.textContent = `${preset.id} (${preset.labels.map((l) => l.name).join(', ')})`;
      select.append(opt);
    }
    if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
    showProblem('');
  } catch (err) {
    showProblem(err.message);
  }
}

async function loadModels() {
  const select = $('model');
  const chosen = select.value;
  if (!apiKey()) return;
  try {
    const list = await api('GET', '/v1/models');
    select.length = 1;
    // the bases workers serve now (each with its family: clipseg, sam3), then the tenant's fine-tuned models
    for (const model of list.data.filter((m) => m.builtin && m.served)) {
      const opt = document.createElement('option');
      opt.value = model.id;
      opt.textContent = `${model.id} (${model.family})`;
      select.append(opt);
    }
    for (const model of list.data.filter((m) => !m.builtin)) {
      const opt = document.createElement('option');
      opt.value = model.id;
      opt.textContent = `${model.id} (${model.labels.map((l) => l.name).join(', ')})`;
      select.append(opt);
    }
    if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  } catch (err) {
    showProblem(err.message);
  }
}

function chosenFile() {
  const files = $('file').files;
  return files && files.length ? files[0] : null;
}

function onFileChosen() {
  const file = chosenFile();
  const preview = $('preview');
  if (!file) { preview.hidden = true; $('file-name').textContent = ''; return; }
  $('file-name').textContent = `${file.name} (${Math.round(file.size / 1024)} KiB)`;
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $('url').value = '';
}

function buildRequest() {
  const prompts = $('prompts').value.split(',').map((p) => p.trim()).filter(Boolean);
  const preset = $('preset').value;
  const model = $('model').value;
  const threshold = $('threshold').value;
  const refine = $('refine').value;
  const outputs = ['mask', 'cutout', 'overlay', 'instances'];
  const file = chosenFile();
  if (file) {
    const form = new FormData();
    form.append('image', file, file.name);
    prompts.forEach((p) => form.append('prompts', p));
    if (preset) form.append('preset', preset);
    if (model) form.append('model', model);
    outputs.forEach((o) => form.append('outputs', o));
    form.append('threshold', threshold);
    if (refine !== 'none') form.append('refine', refine);
    return form;
  }
  const body = { prompts, threshold: Number(threshold), outputs };
  if (refine !== 'none') body.refine = refine;
  if (preset) body.preset = preset;
  if (model) body.model = model;
  const url = $('url').value.trim();
  if (url) body.image_url = url;
  return body;
}

function link(href, text, name) {
  const a = document.createElement('a');
  a.href = href;
  a.textContent = text;
  a.download = name;  // same-origin only; the storage host's file opens in a new tab instead
  a.target = '_blank';
  a.rel = 'noopener';
  return a;
}

function thumb(src, alt) {
  const img = document.createElement('img');
  img.src = src;
  img.alt = alt;
  img.loading = 'lazy';
  return img;
}

const SVG = 'http://www.w3.org/2000/svg';

// Each label's instances as boxes over the overlay, in the image's own pixel coordinates, with the
// instance's score; colours follow the label map's palette order loosely (one hue per label).
function drawInstances(job) {
  const svg = $('instance-boxes');
  svg.replaceChildren();
  if (!job.image) return;
  svg.setAttribute('viewBox', `0 0 ${job.image.width} ${job.image.height}`);
  const stroke = Math.max(1, Math.round(job.image.width / 300));
  job.results.forEach((r, i) => {
    const colour = `hsl(${(i * 137) % 360} 85% 50%)`;
    (r.instances || []).forEach((inst) => {
      const [x0, y0, x1, y1] = inst.bbox;
      const rect = document.createElementNS(SVG, 'rect');
      rect.setAttribute('x', x0);
      rect.setAttribute('y', y0);
      rect.setAttribute('width', x1 - x0);
      rect.setAttribute('height', y1 - y0);
      rect.setAttribute('fill', 'none');
      rect.setAttribute('stroke', colour);
      rect.setAttribute('stroke-width', stroke);
      rect.dataset.label = r.prompt;
      const title = document.createElementNS(SVG, 'title');
      title.textContent = `${r.prompt} ${inst.score.toFixed(2)}`;
      rect.append(title);
      const text = document.createElementNS(SVG, 'text');
      text.setAttribute('x', x0 + stroke);
      text.setAttribute('y', y0 + 10 * stroke);
      text.setAttribute('fill', colour);
      text.setAttribute('font-size', 10 * stroke);
      text.textContent = `${r.prompt} ${inst.score.toFixed(2)}`;
      svg.append(rect, text);
    });
  });
}

function render(job) {
  $('result-section').hidden = false;
  const overlay = job.outputs && job.outputs.overlay_url;
  $('overlay').hidden = !overlay;
  if (overlay) {
    $('overlay').src = overlay;
    $('overlay-download').href = overlay;
  }
  drawInstances(job);
  const labels = $('labels');
  labels.replaceChildren();
  job.results.forEach((r, i) => {
    const card = document.createElement('div');
    card.className = 'label-card';
    card.dataset.label = r.prompt;
    const h = document.createElement('h3');
    h.textContent = r.prompt;
    const facts = document.createElement('p');
    facts.className = 'hint';
    facts.textContent = `score ${r.score.toFixed(2)}, ${(100 * r.area_fraction).toFixed(1)}% of the image` +
      (r.bbox ? '' : ' (nothing found above the threshold)') +
      (r.refine && r.refine !== 'none' ? `, edges: ${r.refine}` : '') +
      (typeof r.presence === 'number' ? `, present: ${(100 * r.presence).toFixed(0)}%` : '') +
      (r.instances ? `, ${r.instances.length} instance${r.instances.length === 1 ? '' : 's'}` : '');
    const pair = document.createElement('div');
    pair.className = 'pair';
    const downloads = document.createElement('p');
    if (r.mask_url) {
      pair.append(thumb(r.mask_url, `mask of ${r.prompt}`));
      downloads.append(link(r.mask_url, 'mask', `${job.id}-${i}-mask.png`), ' ');
    }
    if (r.cutout_url) {
      pair.append(thumb(r.cutout_url, `cutout of ${r.prompt}`));
      downloads.append(link(r.cutout_url, 'cutout', `${job.id}-${i}-cutout.png`));
    }
    card.append(h, facts, pair, downloads);
    labels.append(card);
  });
}

async function submitJob(event) {
  event.preventDefault();
  showProblem('');
  $('result-section').hidden = true;
  if (!apiKey()) { showProblem('Paste your API key above and save it first.'); return; }
  const request = buildRequest();
  if (!(request instanceof FormData) && !request.image_url) { showProblem(PLAIN.missing_image); return; }
  $('submit').disabled = true;
  setStatus('Uploading…', true);
  try {
    let job = await api('POST', '/v1/jobs', { body: request, wait: 20 });
    while (!FINAL.has(job.status)) {
      setStatus(`Job ${job.id}: ${job.status}…`, true);
      job = await api('GET', `/v1/jobs/${job.id}`, { wait: 20 });
    }
    if (job.status === 'succeeded') {
      setStatus(`Job ${job.id} succeeded: ${job.results.length} labels.`, false);
      render(job);
    } else if (job.status === 'failed') {
      const code = job.error && job.error.code;
      setStatus(`Job ${job.id} failed.`, false);
      showProblem(PLAIN[code] || (job.error && job.error.message) || 'The job failed.');
    } else {
      setStatus(`Job ${job.id} was canceled.`, false);
    }
  } catch (err) {
    setStatus('', false);
    showProblem(err.fields ? `${err.message} (${err.fields})` : err.message);
  } finally {
    $('submit').disabled = false;
  }
}

document.addEventListener('DOMContentLoaded', () => {
  showKeyState();
  loadPresets();
  loadModels();
  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const key = $('key').value.trim();
    if (key) localStorage.setItem(KEY, key);
    $('key').value = '';
    showKeyState();
    loadPresets();
    loadModels();
  });
  $('forget-key').addEventListener('click', () => { localStorage.removeItem(KEY); showKeyState(); });
  $('file').addEventListener('change', onFileChosen);
  $('threshold').addEventListener('input', () => {
    $('threshold-value').textContent = Number($('threshold').value).toFixed(2);
  });
  const drop = $('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (e.dataTransfer.files.length) {
      $('file').files = e.dataTransfer.files;
      onFileChosen();
    }
  });
  $('job-form').addEventListener('submit', submitJob);
});
