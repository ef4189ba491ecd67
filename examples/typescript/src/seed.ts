// Calling loss-service from TypeScript (Node 20+), through a client generated
// from the service's own OpenAPI document (openapi/openapi.json):
//   openapi-typescript writes the types (src/schema.d.ts, `npm run generate`),
//   openapi-fetch turns them into a typed fetch client: paths, request bodies
//   and responses are checked by `tsc`.
//
//   LOSS_SERVICE_URL=http://127.0.0.1:8000 npm start          # readable lines
//   node dist/seed.js --json                                    # the results as JSON
//
// It evaluates the seed examples of the HTTP contract and a gradient, checks
// them against the values torch gives (printed to 4 decimals), and shows what
// an invalid request answers. Exit status 1 when a value is off.

import createClient from "openapi-fetch";

import type { components, paths } from "./schema.js";

type Problem = components["schemas"]["Problem"];
type LossResponse = components["schemas"]["LossResponse"];
/** The JSON body of a route's POST, e.g. Body<"/v1/losses/kl_div">. */
type Body<P extends keyof paths> = paths[P] extends {
  post: { requestBody: { content: { "application/json": infer B } } };
}
  ? B
  : never;

const baseUrl = process.env.LOSS_SERVICE_URL ?? "http://127.0.0.1:8000";
const apiKey = process.env.LOSS_SERVICE_API_KEY;
const asJson = process.argv.includes("--json");

const client = createClient<paths>({
  baseUrl,
  headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {},
});

/** One evaluated request: what was sent, what came back. */
interface Outcome {
  loss: string;
  request: Record<string, unknown>;
  value: number;
  grad?: Record<string, unknown>;
}

const outcomes: Outcome[] = [];
const failures: string[] = [];

function isProblem(body: unknown): body is Problem {
  return typeof body === "object" && body !== null && "status" in body && "detail" in body;
}

/** The loss value of a 200 answer, or a thrown error saying what came instead. */
function lossValue(
  loss: string,
  result: { data?: LossResponse; error?: unknown; response: Response },
): LossResponse & { value: number } {
  const { data, error, response } = result;
  if (data === undefined) {
    const detail = isProblem(error) ? error.detail : JSON.stringify(error);
    throw new Error(`${loss}: HTTP ${response.status}: ${detail}`);
  }
  if (typeof data.value !== "number") {
    throw new Error(`${loss}: expected a number, got ${JSON.stringify(data.value)}`);
  }
  return { ...data, value: data.value };
}

function record(
  loss: string,
  request: Record<string, unknown>,
  response: LossResponse & { value: number },
  expected: number,
): void {
  const outcome: Outcome = { loss, request, value: response.value };
  if (response.grad) outcome.grad = response.grad;
  outcomes.push(outcome);
  if (response.value.toFixed(4) !== expected.toFixed(4)) {
    failures.push(`${loss}: ${response.value} is not ${expected.toFixed(4)} to 4 decimals`);
  }
}

// Each call names its route literally, so tsc checks the body against that
// loss's request model; `satisfies Body<...>` does the same for a body built
// beforehand (a misspelt option or a missing `target` fails to compile).
async function seedExamples(): Promise<void> {
  const logits = { input: [[2, 1], [1, 2]], target: [1, 0] } satisfies Body<"/v1/losses/cross_entropy">;
  record("cross_entropy", logits,
    lossValue("cross_entropy", await client.POST("/v1/losses/cross_entropy", { body: logits })),
    1.3133);

  const probabilities = {
    input: [0.4, 0.1], target: [0.2, 0.8],
  } satisfies Body<"/v1/losses/binary_cross_entropy">;
  record("binary_cross_entropy", probabilities,
    lossValue("binary_cross_entropy",
      await client.POST("/v1/losses/binary_cross_entropy", { body: probabilities })),
    1.2275);
  record("binary_cross_entropy_with_logits", probabilities,
    lossValue("binary_cross_entropy_with_logits",
      await client.POST("/v1/losses/binary_cross_entropy_with_logits", { body: probabilities })),
    0.7487);

  const regression = {
    input: [[3, 1], [1, 0]], target: [[1, 0], [1, 0]],
  } satisfies Body<"/v1/losses/mse_loss">;
  record("l1_loss", regression,
    lossValue("l1_loss", await client.POST("/v1/losses/l1_loss", { body: regression })),
    0.75);
  record("mse_loss", regression,
    lossValue("mse_loss", await client.POST("/v1/losses/mse_loss", { body: regression })),
    1.25);

  const logProbabilities = {
    input: [[3, 1], [2, 4]], target: [0, 1],
  } satisfies Body<"/v1/losses/nll_loss">;
  record("nll_loss", logProbabilities,
    lossValue("nll_loss", await client.POST("/v1/losses/nll_loss", { body: logProbabilities })),
    -3.5);

  const divergence = {
    input: [0.5, 0.2, 0.3].map(Math.log),
    target: [0.1, 0.2, 0.7],
    reduction: "sum",
  } satisfies Body<"/v1/losses/kl_div">;
  record("kl_div", divergence,
    lossValue("kl_div", await client.POST("/v1/losses/kl_div", { body: divergence })),
    0.4322);
}

/** The gradient of the seed cross_entropy with respect to its logits. */
async function gradient(): Promise<void> {
  const body = {
    input: [[2, 1], [1, 2]], target: [1, 0], grad: true,
  } satisfies Body<"/v1/losses/cross_entropy">;
  const response = lossValue("cross_entropy",
    await client.POST("/v1/losses/cross_entropy", { body }));
  record("cross_entropy", body, response, 1.3133);
  const grad = response.grad?.input;
  const expected = [[0.3655, -0.3655], [-0.3655, 0.3655]];
  const rounded = Array.isArray(grad)
    ? grad.map((row) => (row as number[]).map((x) => Number(x.toFixed(4))))
    : grad;
  if (JSON.stringify(rounded) !== JSON.stringify(expected)) {
    failures.push(`grad input: ${JSON.stringify(grad)} is not ${JSON.stringify(expected)}`);
  }
}

/** A target of the wrong length: a 422 problem naming the field. */
async function invalidRequest(): Promise<Problem> {
  const { data, error, response } = await client.POST("/v1/losses/cross_entropy", {
    body: { input: [[2, 1], [1, 2]], target: [1, 0, 1] },
  });
  if (data !== undefined || response.status !== 422 || !isProblem(error)) {
    throw new Error(`expected a 422 problem, got HTTP ${response.status}`);
  }
  if (!error.errors?.some((e) => e.loc.includes("target"))) {
    failures.push(`the 422 does not name the target field: ${JSON.stringify(error)}`);
  }
  return error;
}

async function main(): Promise<number> {
  const version = await client.GET("/version");
  if (version.data === undefined) {
    throw new Error(`GET /version: HTTP ${version.response.status}`);
  }
  await seedExamples();
  await gradient();
  const problem = await invalidRequest();
  if (asJson) {
    console.log(JSON.stringify({ version: version.data, outcomes, problem, failures }));
  } else {
    const v = version.data;
    console.log(`${baseUrl}: ${v.name} ${v.version}, torch ${v.torch}, devices ${v.devices.join(", ")}`);
    for (const o of outcomes) {
      const grad = o.grad ? `  grad ${JSON.stringify(o.grad)}` : "";
      console.log(`${o.loss} = ${o.value.toFixed(4)}${grad}`);
    }
    console.log(`invalid request -> ${problem.status}: ${problem.detail}`);
    for (const failure of failures) console.error(`FAILED: ${failure}`);
  }
  return failures.length === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    console.error(error instanceof Error ? error.message : error);
    process.exit(1);
  },
);
