// Independent reference: evaluate a TF.js graph model (model.json + shards) with TF.js itself
// (pure-JS CPU backend) on raw input tensors, and write the requested node outputs.
//
//   TFJS_MODULES=/path/to/node_modules node tools/tfjs_reference.mjs MODEL.json IN_DIR OUT_DIR [NODE ...]
//
// IN_DIR/inputs.json: [{"name": "input_1", "file": "x0.bin", "shape": [1,3,416,416], "dtype": "float32"}, ...]
// (one entry per run; every run feeds the model's single input). For every run r and node n the output
// is written to OUT_DIR/r{r}_{k}.bin (float32 little-endian, k = index of n) and shapes go to
// OUT_DIR/outputs.json. Without NODE arguments the model's signature outputs are fetched.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const modules = process.env.TFJS_MODULES;
if (!modules) throw new Error('set TFJS_MODULES to the node_modules folder holding @tensorflow/tfjs');
const require = createRequire(path.join(path.resolve(modules), 'noop.js'));
const tf = require('@tensorflow/tfjs');

const [modelJson, inDir, outDir, ...nodes] = process.argv.slice(2);
const spec = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
const dir = path.dirname(modelJson);
const weightSpecs = [];
const buffers = [];
for (const group of spec.weightsManifest) {
  weightSpecs.push(...group.weights);
  for (const p of group.paths) buffers.push(fs.readFileSync(path.join(dir, p)));
}
const joined = Buffer.concat(buffers);
const weightData = joined.buffer.slice(joined.byteOffset, joined.byteOffset + joined.byteLength);

await tf.setBackend('cpu');
const model = await tf.loadGraphModel(tf.io.fromMemory({
  modelTopology: spec.modelTopology,
  weightSpecs,
  weightData,
  format: spec.format,
  generatedBy: spec.generatedBy,
  convertedBy: spec.convertedBy,
  signature: spec.signature,
}));
const outputs = nodes.length ? nodes : model.outputNodes;
const runs = JSON.parse(fs.readFileSync(path.join(inDir, 'inputs.json'), 'utf8'));
fs.mkdirSync(outDir, { recursive: true });
const manifest = { backend: tf.getBackend(), tfjs: tf.version.tfjs, outputs, runs: [] };
for (const [r, run] of runs.entries()) {
  const buf = fs.readFileSync(path.join(inDir, run.file));
  const Typed = run.dtype === 'int32' ? Int32Array : Float32Array;
  const data = new Typed(buf.buffer, buf.byteOffset, buf.byteLength / 4);
  const x = tf.tensor(data, run.shape, run.dtype);
  let res = model.execute(x, outputs);
  if (!Array.isArray(res)) res = [res];
  const shapes = [];
  for (const [k, t] of res.entries()) {
    const v = await t.data();
    const f32 = Float32Array.from(v);
    fs.writeFileSync(path.join(outDir, `r${r}_${k}.bin`), Buffer.from(f32.buffer));
    shapes.push(t.shape);
  }
  manifest.runs.push(shapes);
  tf.dispose([x, ...res]);
}
fs.writeFileSync(path.join(outDir, 'outputs.json'), JSON.stringify(manifest, null, 1));
console.log(`tfjs ${tf.version.tfjs} (${tf.getBackend()}): ${runs.length} runs x ${outputs.length} outputs -> ${outDir}`);
