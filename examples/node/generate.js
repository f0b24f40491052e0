#!/usr/bin/env node
// Streams one completion from an OpenLoRA worker, reading protos/ directly (no generated code).
//
//   node generate.js --target 127.0.0.1:50052 --key olk_... [--adapter NAME] [--max-tokens 32] "prompt"
//
// Target and key fall back to OPENLORA_TARGET and OPENLORA_API_KEY. Text goes to stdout as it
// arrives; the final usage goes to stderr as one JSON line.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");

const USAGE =
  "usage: node generate.js [--target HOST:PORT] [--key KEY] [--adapter NAME] [--max-tokens N] PROMPT\n" +
  "  --target      worker address (OPENLORA_TARGET; default 127.0.0.1:50052)\n" +
  "  --key         api key (OPENLORA_API_KEY)\n" +
  "  --adapter     adapter or saved mix name (default: the base model)\n" +
  "  --max-tokens  tokens to generate at most (default 32)\n";

function parseArgs(argv) {
  const options = {
    target: process.env.OPENLORA_TARGET || "127.0.0.1:50052",
    key: process.env.OPENLORA_API_KEY || "",
    adapter: "",
    maxTokens: 32,
    prompt: null,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === "--target") options.target = next();
    else if (arg === "--key") options.key = next();
    else if (arg === "--adapter") options.adapter = next();
    else if (arg === "--max-tokens") {
      const value = next();
      if (!/^[0-9]+$/.test(value) || Number(value) < 1) {
        throw new Error(`--max-tokens must be a positive integer, got ${value}`);
      }
      options.maxTokens = Number(value);
    } else if (arg === "--help" || arg === "-h") options.help = true;
    // An option this client does not know (a misspelled --adapter) is refused, never sent as the prompt.
    else if (arg.startsWith("--")) throw new Error(`unknown option ${arg}`);
    else if (options.prompt === null) options.prompt = arg;
    else throw new Error(`unexpected argument ${arg}`);
  }
  if (options.help) return options;
  if (options.prompt === null) throw new Error("a prompt is required");
  return options;
}

function loadInferenceService() {
  const definition = protoLoader.loadSync("openlora/v1/inference.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).openlora.v1.InferenceService;
}

function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`error: ${err.message}\n${USAGE}`);
    process.exit(2);
  }
  if (options.help) {
    process.stdout.write(USAGE);
    return;
  }
  const InferenceService = loadInferenceService();
  const client = new InferenceService(options.target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${options.key}`);

  const call = client.Generate(
    { prompt: options.prompt, adapter: options.adapter, sampling: { max_tokens: options.maxTokens } },
    metadata,
  );
  call.on("data", (message) => {
    process.stdout.write(message.text);
    if (message.finish_reason && message.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
      process.stderr.write(
        `${JSON.stringify({ finish_reason: message.finish_reason, usage: message.usage, timing: message.timing })}\n`,
      );
    }
  });
  call.on("error", (err) => {
    process.stderr.write(`error: ${grpc.status[err.code]}: ${err.details}\n`);
    process.exitCode = 1;
  });
  call.on("end", () => {
    process.stdout.write("\n");
    client.close();
  });
}

main();
