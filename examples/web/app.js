// Classify images in the browser with a model exported by `pipeline export` (onnxruntime-web,
// WASM). The model takes decoded RGB pixels of any size and resizes, crops and normalises them
// inside the graph, so the page only decodes: draw the image at its own size, read the pixels.
// Class names come from the JSON sidecar (model.onnx.json): onnxruntime-web does not expose
// ONNX metadata to JavaScript.
//
// URL parameters: ?model=URL (default model.onnx); ?images=URL of a JSON list of image URLs
// classifies them all and writes the results as JSON into <pre id="results"> (used by the tests).
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';

ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
ort.env.wasm.numThreads = 1;  // threads need COOP/COEP headers; one thread works everywhere

const params = new URLSearchParams(location.search);
const modelUrl = params.get('model') || 'model.onnx';

async function loadModel(url) {
  const contract = await (await fetch(`${url}.json`)).json();
  const session = await ort.InferenceSession.create(url, { executionProviders: ['wasm'] });
  return { session, contract };
}

// An <img> (decoded by the browser) -> RGB uint8 [1, H, W, 3] at its natural size.
function pixels(img) {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.fillStyle = '#fff';  // transparent pixels over white, as `pipeline prepare` does
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const rgb = new Uint8Array(canvas.width * canvas.height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
  }
  return new ort.Tensor('uint8', rgb, [1, canvas.height, canvas.width, 3]);
}

// Top-k labels, and (a model with the in_distribution output) whether the image is none of
// the classes: its score below the sidecar's out_of_distribution.threshold.
async function classify(model, img, topK = 5) {
  const out = await model.session.run({ [model.contract.input_name]: pixels(img) });
  const p = Array.from(out.probabilities.data);
  const order = p.map((v, i) => [v, i]).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  const result = {
    predictions: order.slice(0, topK).map(([v, i]) => ({ label: model.contract.classes[i], probability: v })),
  };
  const ood = model.contract.out_of_distribution || { method: 'none' };
  if (ood.method !== 'none' && out[ood.output]) {
    result.in_distribution = out[ood.output].data[0];
    result.unknown = result.in_distribution < ood.threshold;
  }
  return result;
}

async function loadImage(src) {
  const img = new Image();
  img.src = src;
  await img.decode();
  return img;
}

function show({ predictions, unknown, in_distribution: score }) {
  const verdict = document.getElementById('verdict');
  verdict.textContent = unknown
    ? `None of these: it does not look like the training images (in_distribution ${score.toFixed(3)}). Closest:`
    : '';
  verdict.hidden = !unknown;
  const top = document.getElementById('top');
  top.replaceChildren(...predictions.map(({ label, probability }) => {
    const row = document.createElement('div');
    row.className = 'row';
    const bar = document.createElement('div');
    bar.className = 'bar';
    bar.style.width = `${(100 * probability).toFixed(1)}%`;
    row.append(Object.assign(document.createElement('span'), { textContent: label }), bar,
               Object.assign(document.createElement('span'), { textContent: probability.toFixed(3) }));
    return row;
  }));
}

async function main() {
  const status = document.getElementById('status');
  const model = await loadModel(modelUrl);
  status.textContent = `Model ready: ${model.contract.classes.length} classes.`;
  const listUrl = params.get('images');
  if (listUrl) {
    const urls = await (await fetch(listUrl)).json();
    const results = [];
    for (const url of urls) {
      results.push({ path: url, ...(await classify(model, await loadImage(url))) });
    }
    const pre = document.getElementById('results');
    pre.textContent = JSON.stringify(results);
    pre.hidden = false;
    document.title = 'done';
    return;
  }
  const handle = async (file) => {
    const url = URL.createObjectURL(file);
    document.getElementById('preview').src = url;
    show(await classify(model, await loadImage(url), 5));
  };
  document.getElementById('file').addEventListener('change', (e) => handle(e.target.files[0]));
  const drop = document.getElementById('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    if (e.dataTransfer.files.length) handle(e.dataTransfer.files[0]);
  });
}

main().catch((err) => {
  document.getElementById('status').textContent = `Error: ${err.message || err}`;
  document.title = 'error';
  console.error(err);
});
