// OpenAI's own Node SDK (`openai`) pointed at the gateway, as a backend written against
// OpenAI's Images API would switch (docs/api.md#openai). Run by tests/test_js_openai.py:
//
//   GATEWAY_URL=http://127.0.0.1:8000 GATEWAY_KEY=gk_... node tests/js/openai_images.mjs
//
// It generates with model "local" at 768x512 (a URL), again as b64_json, lists the
// models, then makes one call with a bad key, one with an unknown model and, with
// GATEWAY_SPENT_KEY (a key whose daily limit is spent), one with the SDK's own retries
// on, and prints one JSON line: what it got, and each error's SDK class name and status.
import OpenAI from "openai";

const base = process.env.GATEWAY_URL;
const key = process.env.GATEWAY_KEY;
if (!base || !key) {
  console.error("set GATEWAY_URL and GATEWAY_KEY");
  process.exit(2);
}
const deadline = setTimeout(() => {
  console.error("timed out");
  process.exit(3);
}, Number(process.env.CLIENT_TIMEOUT_MS || 60000));

// No retries: each refusal is seen as the SDK raises it (it retries 429 and 5xx).
const connect = (apiKey) => new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0 });
const client = connect(key);

async function refusal(call) {
  try {
    await call();
  } catch (error) {
    return {
      class: error.constructor.name,
      status: error.status ?? null,
      code: error.code ?? null,
      type: error.type ?? null,
      param: error.param ?? null,
      isAPIError: error instanceof OpenAI.APIError,
    };
  }
  return null; // it did not fail
}

const url = await client.images.generate({
  model: "local",
  prompt: "a lighthouse at dusk",
  size: "768x512",
});
const b64 = await client.images.generate({
  model: "local",
  prompt: "two foxes in the snow",
  size: "768x512",
  response_format: "b64_json",
});
const models = [];
for await (const model of client.models.list()) {
  models.push({ id: model.id, object: model.object, owned_by: model.owned_by });
}
// The right account with a wrong secret: well formed, so the gateway checks it.
const wrongSecret = key.slice(0, -4) + (key.endsWith("zzzz") ? "yyyy" : "zzzz");
const badKey = await refusal(() =>
  connect(wrongSecret).images.generate({ model: "local", prompt: "a boat" }),
);
const unknownModel = await refusal(() =>
  client.images.generate({ model: "no-such-model", prompt: "a boat" }),
);
// The SDK retries a 429 after its Retry-After, however long: a day's limit says hours,
// and the gateway tells it not to (`x-should-retry: false`), so this fails at once.
const spent = process.env.GATEWAY_SPENT_KEY;
const dailyLimit = spent
  ? await refusal(() =>
      new OpenAI({ baseURL: `${base}/v1`, apiKey: spent }).images.generate({
        model: "local",
        prompt: "a boat",
      }),
    )
  : null;

clearTimeout(deadline);
console.log(
  JSON.stringify({
    url: {
      created: url.created,
      size: url.size,
      data: url.data.map((d) => ({ url: d.url, revised_prompt: d.revised_prompt })),
    },
    b64: {
      created: b64.created,
      size: b64.size,
      data: b64.data.map((d) => ({ b64_json: d.b64_json, revised_prompt: d.revised_prompt })),
    },
    models,
    errors: { badKey, unknownModel, dailyLimit },
  }),
);
