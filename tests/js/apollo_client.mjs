// A real JavaScript client of the gateway, as a frontend would write it: Apollo Client
// with Apollo's persisted-query link (hashes, GET for queries) over its HttpLink, and
// graphql-ws for the subscription. Run by tests/test_js_clients.py:
//
//   GATEWAY_URL=http://127.0.0.1:8000 GATEWAY_KEY=gk_... node tests/js/apollo_client.mjs
//
// It generates an image (generateImage, POST), polls `job` until the job has ended (at
// least three reads), follows `jobUpdates` over graphql-transport-ws meanwhile, fetches
// the image, and prints one JSON line: what it saw, and every HTTP request it sent.
import { createHash } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";

import { ApolloClient, HttpLink, InMemoryCache, gql } from "@apollo/client";
import { createPersistedQueryLink } from "@apollo/client/link/persisted-queries";
import { createClient } from "graphql-ws";
import WebSocket from "ws";

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

// Every request Apollo sends: method, URL, and which members it carried.
const requests = [];
async function recordingFetch(input, init = {}) {
  const url = new URL(typeof input === "string" ? input : input.url);
  const method = (init.method || "GET").toUpperCase();
  let members;
  if (method === "GET") {
    members = [...url.searchParams.keys()];
  } else {
    members = Object.keys(JSON.parse(init.body));
  }
  const response = await fetch(input, init);
  const text = await response.clone().text();
  let code = null;
  try {
    code = JSON.parse(text).errors?.[0]?.extensions?.code ?? null;
  } catch {}
  requests.push({ method, url: url.href, members, status: response.status, code });
  return response;
}

const sha256 = (text) => createHash("sha256").update(text).digest("hex");
const client = new ApolloClient({
  link: createPersistedQueryLink({ sha256, useGETForHashedQueries: true }).concat(
    new HttpLink({
      uri: `${base}/graphql`,
      fetch: recordingFetch,
      headers: { Authorization: `Bearer ${key}` },
    }),
  ),
  cache: new InMemoryCache(),
});

const GENERATE = gql`
  mutation GenerateImage($input: ImageGenerationInput!) {
    generateImage(input: $input) {
      id
      status
      creditCost
    }
  }
`;
const JOB = gql`
  query Job($id: ID!) {
    job(id: $id) {
      id
      status
      url
      width
      height
    }
  }
`;
const UPDATES = `subscription Updates($id: ID!) { jobUpdates(id: $id) { id status url } }`;
const ENDED = new Set(["completed", "failed", "cancelled"]);

const made = await client.mutate({
  mutation: GENERATE,
  variables: {
    input: { service: "local", prompt: "a lighthouse at dusk", width: 512, height: 512 },
  },
});
const generated = made.data.generateImage;
const id = generated.id;

const ws = createClient({
  url: `${base.replace(/^http/, "ws")}/graphql`,
  webSocketImpl: WebSocket,
  connectionParams: { Authorization: `Bearer ${key}` },
});
const statuses = [];
const followed = new Promise((resolve, reject) => {
  ws.subscribe(
    { query: UPDATES, variables: { id } },
    {
      next: (result) => {
        if (result.errors) reject(new Error(JSON.stringify(result.errors)));
        else statuses.push(result.data.jobUpdates.status);
      },
      error: (error) => reject(error instanceof Error ? error : new Error(String(error))),
      complete: resolve,
    },
  );
});

const polls = [];
let job;
while (true) {
  const result = await client.query({ query: JOB, variables: { id }, fetchPolicy: "network-only" });
  job = result.data.job;
  polls.push(job.status);
  if (ENDED.has(job.status) && polls.length >= 3) break;
  await sleep(50);
}
await followed;
await ws.dispose();

const image = await fetch(job.url);
const bytes = (await image.arrayBuffer()).byteLength;
clearTimeout(deadline);
console.log(
  JSON.stringify({
    generated,
    job,
    polls,
    statuses,
    image: { status: image.status, contentType: image.headers.get("content-type"), bytes },
    requests,
  }),
);
