#!/usr/bin/env node
// A reconciliation job over customermapping.v1 (Node.js): List every mapping
// and compare it with Stripe's own customer list.
//
// Usage: node reconcile.js HOST:PORT
//
// Walks every mapping with List (keyset pages, following next_page_token
// until it is empty) and reports mappings whose customer Stripe no longer
// has, and Stripe customers no mapping holds (orphans). BatchGet then fetches
// the mappings of a webhook batch in one call. To be self-contained it first
// links a few mappings and fakes Stripe's list. Prints the same lines as
// ../python/reconcile.py.
'use strict';

const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const DEADLINE_MS = 5000;
const PAGE_SIZE = 2; // small to show the paging; a real job uses up to 1000

const definition = protoLoader.loadSync('customermapping/v1/customer_mapping.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  defaults: true,
  oneofs: true,
  longs: String,
  enums: String,
});
const { CustomerMapping } = grpc.loadPackageDefinition(definition).customermapping.v1;

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

// Every mapping, oldest first: one present for the whole walk comes exactly
// once, even while other callers Link and Unlink. On UNAVAILABLE a job
// retries the same token: tokens do not expire.
async function allMappings(client) {
  const mappings = [];
  let page_token = '';
  let pages = 0;
  for (;;) {
    const page = await unary(client, 'List', { page_size: PAGE_SIZE, page_token });
    pages += 1;
    mappings.push(...page.mappings);
    if (!page.next_page_token) return { mappings, pages };
    page_token = page.next_page_token;
  }
}

async function main(address) {
  const client = new CustomerMapping(address, grpc.credentials.createInsecure());
  const run = crypto.randomBytes(4).toString('hex');
  const linked = new Map();
  for (let i = 0; i < 5; i += 1) {
    const user = `user-${run}-${i}`;
    const customer = `cus_${run}R${i}`;
    await unary(client, 'Link', { user_id: user, stripe_customer_id: customer });
    linked.set(customer, user);
  }
  // Stripe lost customer 0 and has one customer nobody linked.
  const stripe = new Set([...linked.keys()].filter((c) => c !== `cus_${run}R0`));
  stripe.add(`cus_${run}Orphan`);

  const { mappings, pages } = await allMappings(client);
  const ours = new Map(
    mappings.filter((m) => m.stripe_customer_id.includes(run)).map((m) => [m.stripe_customer_id, m.user_id]),
  );
  const same = ours.size === linked.size && [...linked].every(([c, u]) => ours.get(c) === u);
  if (!same) throw new Error(`List returned ${JSON.stringify([...ours])}`);
  console.log(`RECONCILE listed mappings=${ours.size} pages=${pages}`);
  for (const customer of [...ours.keys()].filter((c) => !stripe.has(c)).sort()) {
    console.log(`RECONCILE missing-in-stripe customer=${customer} user=${ours.get(customer)}`);
  }
  for (const customer of [...stripe].filter((c) => !ours.has(c)).sort()) {
    console.log(`RECONCILE orphan customer=${customer}`);
  }

  const keys = [`cus_${run}R1`, `cus_${run}Orphan`].map((c) => ({ stripe_customer_id: c }));
  const { results } = await unary(client, 'BatchGet', { keys });
  const found = results.map((r) => (r.mapping ? r.mapping.user_id : '-'));
  console.log(`RECONCILE batch-get users=${found.join(',')}`);
  console.log('DONE reconcile OK');
  client.close();
}

if (process.argv.length !== 3) {
  console.error('usage: node reconcile.js HOST:PORT');
  process.exit(2);
}
main(process.argv[2]).catch((err) => {
  console.log(`RECONCILE FAIL ${err.message}`);
  process.exit(1);
});
