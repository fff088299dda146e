// transformers.js's zero-shot image classification pipeline, offline, on a local model folder; prints its scores as
// JSON. Usage: node zero_shot.mjs MODEL_FOLDER IMAGE DTYPE LABEL... (DTYPE fp32 runs onnx/model.onnx, q8
// onnx/model_quantized.onnx). Labels are used as they are (hypothesis template "{}").
import path from "node:path";

import { env, pipeline } from "@huggingface/transformers";

const [folder, image, dtype, ...labels] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(folder));
const classifier = await pipeline("zero-shot-image-classification", path.basename(folder), { dtype });
const scores = await classifier(path.resolve(image), labels, { hypothesis_template: "{}" });
console.log(JSON.stringify(scores));
