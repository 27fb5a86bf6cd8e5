// Call hotpath from Node.js: load proto/grpc_service.proto at run time with @grpc/proto-loader,
// then ServerReady, ModelMetadata and ModelInfer on the demo model, sending the tensor as raw bytes.
//
// Usage: node infer.js [host:port]     (default localhost:8001; start the server with `hotpath serve`)
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = path.resolve(__dirname, "..", "..", "proto");
const address = process.argv[2] || "localhost:8001";

const definition = protoLoader.loadSync(path.join(PROTO_DIR, "grpc_service.proto"), {
  includeDirs: [PROTO_DIR],
  keepCase: true, // field names as in the .proto: model_name, raw_input_contents
  longs: Number, // int64 shapes as plain numbers
  enums: String,
  defaults: true,
});
const { inference } = grpc.loadPackageDefinition(definition);
const client = new inference.GRPCInferenceService(address, grpc.credentials.createInsecure());

// One unary call as a promise, with a 10 s deadline.
function call(method, request) {
  const deadline = new Date(Date.now() + 10_000);
  return new Promise((resolve, reject) =>
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response))),
  );
}

const describe = (t) => `${t.name} ${t.datatype} [${t.shape.join(",")}]`;

async function main() {
  const { ready } = await call("ServerReady", {});
  console.log(`server ready: ${ready}`);

  const meta = await call("ModelMetadata", { name: "demo" });
  console.log(`model ${meta.name} (versions ${meta.versions.join(",")}): ` +
    `inputs ${meta.inputs.map(describe).join(", ")}; outputs ${meta.outputs.map(describe).join(", ")}`);

  const rows = [[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.6, 2.0]];
  const features = Buffer.from(new Float32Array(rows.flat()).buffer); // FP32 raw contents are little-endian
  const response = await call("ModelInfer", {
    model_name: "demo",
    id: "node-example",
    inputs: [{ name: "features", datatype: "FP32", shape: [rows.length, 4] }],
    raw_input_contents: [features],
  });

  const outputs = {};
  response.outputs.forEach((tensor, i) => { outputs[tensor.name] = { tensor, raw: response.raw_output_contents[i] }; });
  const probabilities = outputs.probabilities;
  const classes = probabilities.tensor.shape[1];
  console.log(`response id ${response.id} from ${response.model_name} version ${response.model_version}`);
  for (let row = 0; row < rows.length; row++) {
    const label = outputs.label.raw.readBigInt64LE(row * 8);
    const probs = Array.from({ length: classes }, (_, c) => probabilities.raw.readFloatLE((row * classes + c) * 4));
    console.log(`row ${row}: label ${label}, probabilities [${probs.map((p) => p.toFixed(4)).join(", ")}]`);
  }
}

main()
  .catch((error) => {
    const status = error.code === undefined ? "" : `${grpc.status[error.code]}: `;
    console.error(`error: ${status}${error.details || error.message}`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
