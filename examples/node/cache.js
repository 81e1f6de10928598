#!/usr/bin/env node
// A local cache of every mapping, kept exact with List + Watch (Node.js).
//
// Usage: node cache.js ADDR_A ADDR_B [--churn N]
//
// `MappingCache` is the reusable part (README "Watching changes"): open Watch
// with an empty `after` (the first response is a bookmark: cursor c), List
// every page into memory, then apply the stream's events after c in order,
// remembering each response's cursor. After a stream error it resumes with
// `after` = the last cursor (exponential backoff, capped and jittered), on
// whichever address it is pointed at; on INVALID_ARGUMENT (a cursor this
// deployment did not hand out) it lists again from scratch. No response for
// twice the bookmark interval (plus slack) counts as a dead stream: it
// cancels the call and resumes. Look-ups by user id or by customer id answer
// from memory.
//
// The program does what ../python/cache.py does and prints the same lines:
// `CACHE listed=<n> cached=<n> events=<n> resumes=<n>` and `DONE cache OK`,
// or `CACHE FAIL <why>` and exit 1.
'use strict';

const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const DEADLINE_MS = 5000;
const PAGE_SIZE = 1000;

const definition = protoLoader.loadSync('customermapping/v1/customer_mapping.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  defaults: true,
  oneofs: true,
  longs: String,
  enums: String,
});
const { CustomerMapping } = grpc.loadPackageDefinition(definition).customermapping.v1;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

// A mapping as a comparable value: both ids and when it was linked (a re-link
// of the same pair is a new mapping).
function mappingKey(m) {
  const t = m.create_time || { seconds: '0', nanos: 0 };
  return { user: m.user_id, customer: m.stripe_customer_id, id: `${m.user_id}|${m.stripe_customer_id}|${t.seconds}.${t.nanos}` };
}

// Every mapping, following next_page_token until it is empty.
async function listAll(client) {
  const mappings = [];
  let page_token = '';
  for (;;) {
    const page = await unary(client, 'List', { page_size: PAGE_SIZE, page_token });
    mappings.push(...page.mappings.map(mappingKey));
    if (!page.next_page_token) return mappings;
    page_token = page.next_page_token;
  }
}

class MappingCache {
  constructor(client, { bookmarkIntervalMs = 10000, backoffBaseMs = 100, backoffMaxMs = 5000 } = {}) {
    this.client = client;
    this.deadAfterMs = 2 * bookmarkIntervalMs + 5000; // 10 s bookmarks: 25 s
    this.backoffBaseMs = backoffBaseMs;
    this.backoffMaxMs = backoffMaxMs;
    this.byUser = new Map();
    this.byCustomer = new Map();
    this.call = null;
    this.lastActivity = Date.now();
    this.stopped = false;
    this.waiters = new Set();
    this.cursor = '';
    this.events = 0; // events applied
    this.resumes = 0; // Watch calls with after = the last cursor
    this.relists = 0; // full relists after the first (attempts)
  }

  // --- look-ups, from memory ---
  customerOf(userId) {
    const m = this.byUser.get(userId);
    return m ? m.customer : undefined;
  }

  userOf(stripeCustomerId) {
    const m = this.byCustomer.get(stripeCustomerId);
    return m ? m.user : undefined;
  }

  snapshot() {
    return new Set([...this.byUser.values()].map((m) => m.id));
  }

  // Resolves true once predicate(cache) holds after some applied response,
  // false after timeoutMs.
  waitUntil(predicate, timeoutMs) {
    if (predicate(this)) return Promise.resolve(true);
    return new Promise((resolve) => {
      const waiter = () => {
        if (!predicate(this)) return;
        clearTimeout(timer);
        this.waiters.delete(waiter);
        resolve(true);
      };
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        resolve(false);
      }, timeoutMs);
      this.waiters.add(waiter);
    });
  }

  // --- lifecycle ---
  // Bookmark, full List, then follows the stream in the background. Errors of
  // this first sync reject the returned promise.
  async start() {
    const stream = await this.open(true);
    this.watchdog = setInterval(() => this.checkAlive(), 1000);
    this.loop = this.run(stream);
  }

  // Follows the feed through another address (another replica): the current
  // stream is cancelled and resumed there from the last cursor.
  switchTo(client) {
    this.client = client;
    if (this.call) this.call.cancel();
  }

  async stop() {
    this.stopped = true;
    clearInterval(this.watchdog);
    if (this.call) this.call.cancel();
    await this.loop;
  }

  // --- the stream ---
  async open(relist) {
    const client = this.client;
    const call = client.Watch(relist ? {} : { after: this.cursor });
    this.call = call;
    this.lastActivity = Date.now();
    if (this.stopped) call.cancel();
    const stream = call[Symbol.asyncIterator]();
    if (relist) {
      const bookmark = await stream.next(); // no events, the cursor c
      if (bookmark.done) throw Object.assign(new Error('Watch ended before its bookmark'), { code: grpc.status.UNAVAILABLE });
      const mappings = await listAll(client);
      this.byUser = new Map(mappings.map((m) => [m.user, m]));
      this.byCustomer = new Map(mappings.map((m) => [m.customer, m]));
      this.apply(bookmark.value);
    } else {
      this.resumes += 1;
    }
    return stream;
  }

  async run(stream) {
    let failures = 0;
    let relist = false;
    for (;;) {
      try {
        if (stream === null) {
          if (relist) this.relists += 1; // counted before its look-ups can see it
          stream = await this.open(relist);
          relist = false;
        }
        for (let next = await stream.next(); !next.done; next = await stream.next()) {
          failures = 0;
          this.apply(next.value);
        }
        // The server ended the stream without an error: resume too.
      } catch (err) {
        // The cursor is not this deployment's: start over.
        if (err.code === grpc.status.INVALID_ARGUMENT) relist = true;
      }
      stream = null;
      if (this.stopped) return;
      failures += 1;
      const delay = Math.min(this.backoffMaxMs, this.backoffBaseMs * 2 ** (failures - 1));
      await sleep(delay / 2 + Math.random() * (delay / 2));
    }
  }

  apply(response) {
    for (const event of response.events) {
      const m = mappingKey(event.mapping);
      if (event.kind === 'KIND_LINKED') {
        this.remove(this.byUser.get(m.user));
        this.remove(this.byCustomer.get(m.customer));
        this.byUser.set(m.user, m);
        this.byCustomer.set(m.customer, m);
      } else if (event.kind === 'KIND_UNLINKED') {
        const held = this.byUser.get(m.user);
        if (held && held.id === m.id) this.remove(held); // still the same mapping
      }
      this.events += 1;
    }
    this.cursor = response.cursor;
    this.lastActivity = Date.now();
    for (const waiter of [...this.waiters]) waiter();
  }

  remove(m) {
    if (!m) return;
    if (this.byUser.get(m.user) === m) this.byUser.delete(m.user);
    if (this.byCustomer.get(m.customer) === m) this.byCustomer.delete(m.customer);
  }

  // No response (events or bookmark) for too long: a dead stream.
  checkAlive() {
    if (Date.now() - this.lastActivity > this.deadAfterMs && this.call) {
      this.lastActivity = Date.now();
      this.call.cancel();
    }
  }
}

// --- the demonstration --------------------------------------------------------
const EXPECTED = [grpc.status.ALREADY_EXISTS, grpc.status.NOT_FOUND];
const RETRIED = [grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.ABORTED];

// One unary call with a deadline; ALREADY_EXISTS and NOT_FOUND are outcomes
// of the churn, transient codes are retried a few times.
async function callWithRetry(client, method, request) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await unary(client, method, request);
    } catch (err) {
      if (EXPECTED.includes(err.code)) return null;
      if (!RETRIED.includes(err.code) || attempt === 3) throw err;
      await sleep(200 * 2 ** attempt);
    }
  }
}

async function main(addrA, addrB, churn) {
  const clients = [addrA, addrB].map((a) => new CustomerMapping(a, grpc.credentials.createInsecure()));
  const cache = new MappingCache(clients[0]);
  await cache.start();

  const run = crypto.randomBytes(4).toString('hex');
  const users = [0, 1, 2, 3, 4].map((i) => `user-${run}-${i}`);
  const customers = [0, 1, 2, 3, 4].map((i) => `cus_${run}C${i}`);
  const pick = (xs) => xs[Math.floor(Math.random() * xs.length)];
  for (let i = 0; i < churn; i += 1) {
    if (i === Math.floor(churn / 2)) cache.switchTo(clients[1]);
    const client = clients[i % 2];
    const r = Math.random();
    if (r < 0.6) {
      await callWithRetry(client, 'Link', { user_id: pick(users), stripe_customer_id: pick(customers) });
    } else if (r < 0.8) {
      await callWithRetry(client, 'Unlink', { user_id: pick(users) });
    } else {
      await callWithRetry(client, 'Unlink', { stripe_customer_id: pick(customers) });
    }
  }

  const markerUser = `user-${run}-marker`;
  const markerCustomer = `cus_${run}Marker`;
  await callWithRetry(clients[1], 'Link', { user_id: markerUser, stripe_customer_id: markerCustomer });
  if (!(await cache.waitUntil((c) => c.customerOf(markerUser) === markerCustomer, 30000))) {
    throw new Error(`the marker link never reached the cache (cursor ${JSON.stringify(cache.cursor)})`);
  }

  // Other writers (an import, another example) may still be committing: a
  // fresh List and the cache then differ for as long as the feed takes to
  // deliver (WATCH_POLL_INTERVAL); compare again until equal, 30 s at most.
  const deadline = Date.now() + 30000;
  let listed;
  let cached;
  for (;;) {
    listed = new Set((await listAll(clients[0])).map((m) => m.id));
    cached = cache.snapshot();
    const equal = listed.size === cached.size && [...listed].every((id) => cached.has(id));
    if (equal || Date.now() > deadline) break;
    await sleep(500);
  }
  await cache.stop();
  clients.forEach((c) => c.close());
  console.log(`CACHE listed=${listed.size} cached=${cached.size} events=${cache.events} resumes=${cache.resumes}`);
  const onlyList = [...listed].filter((id) => !cached.has(id)).sort().slice(0, 5);
  const onlyCache = [...cached].filter((id) => !listed.has(id)).sort().slice(0, 5);
  if (onlyList.length || onlyCache.length) {
    throw new Error(`only in List: ${onlyList.join(',')} only in cache: ${onlyCache.join(',')}`);
  }
  console.log('DONE cache OK');
}

module.exports = { MappingCache };

if (require.main === module) {
  const args = process.argv.slice(2);
  let churn = 200;
  const at = args.indexOf('--churn');
  if (at !== -1) {
    churn = Number(args[at + 1]);
    args.splice(at, 2);
  }
  if (args.length !== 2 || !Number.isInteger(churn) || churn < 0) {
    console.error('usage: node cache.js ADDR_A ADDR_B [--churn N]');
    process.exit(2);
  }
  main(args[0], args[1], churn).catch((err) => {
    console.log(`CACHE FAIL ${err.message}`);
    process.exit(1);
  });
}
