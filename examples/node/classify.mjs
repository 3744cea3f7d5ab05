// Classify images with a model exported by `pipeline export`, in Node.
//
//   ONNXRUNTIME_NODE_INSTALL=skip npm install
//   node classify.mjs path/to/model.onnx photo.jpg other.png [--top-k 3]
//
// The model takes decoded RGB pixels of any size ([1, H, W, 3] uint8) and resizes, crops and
// normalises inside the graph, so there is no resize code here: decode, run, read the labels.
// Class names and the contract come from the JSON sidecar next to the model (model.onnx.json),
// because onnxruntime-node does not expose an ONNX file's metadata to JavaScript.
// Prints one JSON line per image, like `pipeline predict --json`. A model with the
// `in_distribution` output (the sidecar's out_of_distribution.threshold) also says when an
// image is none of its classes: "unknown": true, and "none of these" on standard error.
import fs from 'node:fs';
import ort from 'onnxruntime-node';
import jpeg from 'jpeg-js';
import { PNG } from 'pngjs';

// RGBA (or grey + alpha) pixels -> RGB, alpha composited over white as `pipeline prepare` does.
function toRgb(rgba, width, height) {
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    const a = rgba[i + 3];
    for (let c = 0; c < 3; c++) {
      // Pillow's alpha_composite over an opaque white background, rounded the same way
      rgb[j + c] = a === 255 ? rgba[i + c] : Math.floor((rgba[i + c] * a + 255 * (255 - a) + 127) / 255);
    }
  }
  return rgb;
}

export function decode(path) {
  const bytes = fs.readFileSync(path);
  if (bytes[0] === 0x89 && bytes[1] === 0x50) {  // PNG (8 or 16 bit, grey, palette, alpha)
    const png = PNG.sync.read(bytes);
    return { width: png.width, height: png.height, rgb: toRgb(png.data, png.width, png.height) };
  }
  if (bytes[0] === 0xff && bytes[1] === 0xd8) {  // JPEG (EXIF orientation is not applied here)
    const img = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: true });
    return { width: img.width, height: img.height, rgb: toRgb(img.data, img.width, img.height) };
  }
  throw new Error(`${path}: not a PNG or JPEG file`);
}

export async function loadModel(modelPath) {
  const contract = JSON.parse(fs.readFileSync(`${modelPath}.json`, 'utf8'));
  const session = await ort.InferenceSession.create(modelPath, { intraOpNumThreads: 1 });
  return { session, contract };
}

export async function classify({ session, contract }, path, topK = 5) {
  const { width, height, rgb } = decode(path);
  const input = new ort.Tensor('uint8', rgb, [1, height, width, 3]);
  const output = await session.run({ [contract.input_name]: input });
  const probabilities = Array.from(output.probabilities.data);
  const order = probabilities.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  const result = {
    path,
    predictions: order.slice(0, topK).map(([p, i]) => ({ label: contract.classes[i], probability: p })),
  };
  const ood = contract.out_of_distribution || { method: 'none' };
  if (ood.method !== 'none' && output[ood.output]) {
    result.in_distribution = output[ood.output].data[0];
    result.unknown = result.in_distribution < ood.threshold;  // none of these classes
  }
  return result;
}

async function main(argv) {
  const args = argv.slice(2);
  let topK = 5;
  const k = args.indexOf('--top-k');
  if (k >= 0) { topK = Number(args[k + 1]); args.splice(k, 2); }
  const [modelPath, ...images] = args;
  if (!modelPath || images.length === 0) {
    console.error('usage: node classify.mjs MODEL.onnx IMAGE [IMAGE ...] [--top-k K]');
    process.exit(2);
  }
  const model = await loadModel(modelPath);
  let failed = 0;
  for (const path of images) {
    try {
      const result = await classify(model, path, topK);
      if (result.unknown) {
        console.error(`${path}: none of these (in_distribution ${result.in_distribution.toFixed(3)})`);
      }
      console.log(JSON.stringify(result));
    } catch (err) {
      failed += 1;
      console.log(JSON.stringify({ path, error: String(err.message || err) }));
    }
  }
  process.exit(failed ? 1 : 0);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main(process.argv);
}
