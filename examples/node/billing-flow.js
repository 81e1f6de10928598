#!/usr/bin/env node
// A billing service's use of customermapping.v1, step by step (Node.js).
//
// Usage: node billing-flow.js [--cert tls.crt --key tls.key --ca ca.crt
//                              [--server-name NAME]] HOST:PORT
//
// Plaintext without the TLS flags; with them, mutual TLS as the deployment
// serves it (connect.js: the flags, their environment variables).
//
// Shows what a caller in Node does with this service:
//   - get-or-create the Stripe customer of a user (Get; on NOT_FOUND create a
//     customer in Stripe and Link it; on ALREADY_EXISTS adopt the customer that
//     won, read from the google.rpc.ErrorInfo detail),
//   - the Stripe webhook path (Get by stripe_customer_id),
//   - decoding google.rpc.BadRequest for an invalid request,
//   - grpc.health.v1 health checking, deadlines, retries and x-request-id.
//
// Prints one line per step, `STEP <name> OK key=value ...`, then
// `DONE <n> steps OK`; on any surprise `STEP <name> FAIL <why>` and exit 1.
// The same steps and output as ../python/billing_flow.py.
// docs/errors.md explains every status code and how to retry it.
'use strict';

const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const healthCheck = require('grpc-health-check');
const connect = require('./connect');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const SERVICE = 'customermapping.v1.CustomerMapping';
const DOMAIN = 'customermapping.v1';
const DEADLINE_MS = 5000; // always set one: a call without a deadline can hang forever
const MAX_ATTEMPTS = 5;

// --- The client, loaded from the contract at run time (no codegen step). ---
const definition = protoLoader.loadSync('customermapping/v1/customer_mapping.proto', {
  includeDirs: [PROTO_ROOT], // google/protobuf/timestamp.proto is built in
  keepCase: true, // field names as in the .proto: user_id, stripe_customer_id
  defaults: true, // so `created: false` is present, not missing
  oneofs: true,
  longs: String,
  enums: String,
});
const { CustomerMapping } = grpc.loadPackageDefinition(definition).customermapping.v1;
const Health = grpc.makeGenericClientConstructor(healthCheck.service, 'Health');

// --- Error details: google.rpc.Status in the grpc-status-details-bin trailer. ---
// The detail types come from the vendored proto/google/rpc/error_details.proto;
// google.rpc.Status is three fields, declared here rather than vendored.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, target) =>
  path.isAbsolute(target) ? target : path.join(PROTO_ROOT, target);
rpcTypes.loadSync('google/rpc/error_details.proto', { keepCase: true });
const STATUS_PROTO = `syntax = "proto3";
package google.rpc;
import "google/protobuf/any.proto";
message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }`;
protobuf.parse(STATUS_PROTO, rpcTypes, { keepCase: true });
rpcTypes.loadSync('google/protobuf/any.proto', { keepCase: true }); // bundled with protobufjs
rpcTypes.resolveAll();
const RpcStatus = rpcTypes.lookupType('google.rpc.Status');
const ErrorInfo = rpcTypes.lookupType('google.rpc.ErrorInfo');
const BadRequest = rpcTypes.lookupType('google.rpc.BadRequest');

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, n]) => [n, name]));

/** Decodes a call error: { code name, ErrorInfo or null, BadRequest or null }. */
function failure(err) {
  let info = null;
  let badRequest = null;
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (bin) {
    for (const detail of RpcStatus.decode(bin).details) {
      const type = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
      if (type === 'google.rpc.ErrorInfo') info = ErrorInfo.toObject(ErrorInfo.decode(detail.value));
      if (type === 'google.rpc.BadRequest') {
        badRequest = BadRequest.toObject(BadRequest.decode(detail.value), { arrays: true });
      }
    }
  }
  return { code: CODE_NAMES[err.code], info, badRequest };
}

class StepFailed extends Error {}

function check(condition, why) {
  if (!condition) throw new StepFailed(why);
}

function randomString(alphabet, length) {
  let out = '';
  for (let i = 0; i < length; i++) out += alphabet[crypto.randomInt(alphabet.length)];
  return out;
}

// --- Stand-in for the Stripe API (a real billing service calls stripe.customers.*). ---
class FakeStripe {
  constructor() {
    this.customers = new Set();
  }

  createCustomer() {
    const id = `cus_${randomString('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789', 14)}`;
    this.customers.add(id);
    return id;
  }

  deleteCustomer(id) {
    this.customers.delete(id);
  }
}

// --- Calling the service: deadline, request id, retries (see docs/errors.md). ---
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function unary(client, method, request, requestId) {
  return new Promise((resolve, reject) => {
    const metadata = new grpc.Metadata();
    metadata.set('x-request-id', requestId);
    let echoed = null;
    const call = client[method](request, metadata, { deadline: Date.now() + DEADLINE_MS }, (err, response) =>
      err ? reject(err) : resolve({ response, requestId: echoed }),
    );
    call.on('metadata', (md) => {
      [echoed = null] = md.get('x-request-id');
    });
  });
}

/**
 * Calls `method` with a deadline and an x-request-id, retrying what is safe.
 * Link, Get and Unlink are idempotent in effect, so UNAVAILABLE (backoff),
 * ABORTED (immediately, with jitter) and DEADLINE_EXCEEDED may be retried;
 * INTERNAL at most once. The same request id goes with every attempt so the
 * server log ties them together. Resolves to { response, requestId echoed }.
 */
async function call(client, method, request, requestId = `billing-${crypto.randomUUID()}`) {
  let internalRetried = false;
  for (let attempt = 1; ; attempt++) {
    try {
      return await unary(client, method, request, requestId);
    } catch (err) {
      if (attempt === MAX_ATTEMPTS) throw err;
      if (err.code === grpc.status.ABORTED) {
        await sleep(Math.random() * 50);
      } else if (err.code === grpc.status.UNAVAILABLE) {
        await sleep(Math.min(100 * 2 ** (attempt - 1), 3000) * (0.5 + Math.random() / 2));
      } else if (err.code === grpc.status.DEADLINE_EXCEEDED) {
        // outcome unknown; repeating an idempotent call is safe
      } else if (err.code === grpc.status.INTERNAL && !internalRetried) {
        internalRetried = true;
      } else {
        throw err;
      }
    }
  }
}

/** Runs fn, which must fail with `code`; resolves to { info, badRequest, err }. */
async function expectError(fn, code) {
  try {
    await fn();
  } catch (err) {
    if (err instanceof StepFailed || err.code === undefined) throw err;
    const decoded = failure(err);
    check(decoded.code === code, `expected ${code}, got ${decoded.code}: ${err.details}`);
    return { ...decoded, err };
  }
  throw new StepFailed(`expected ${code}, the call succeeded`);
}

/** Checks an ErrorInfo detail; returns what a step prints about it. */
function infoFields(code, info, reason) {
  check(info !== null, 'no google.rpc.ErrorInfo detail');
  check(info.reason === reason, `reason ${info.reason}, expected ${reason}`);
  check(info.domain === DOMAIN, `domain ${info.domain}, expected ${DOMAIN}`);
  const metadata = Object.fromEntries(Object.entries(info.metadata).sort(([a], [b]) => (a < b ? -1 : 1)));
  return { code, reason: info.reason, domain: info.domain, ...metadata };
}

const sameJson = (a, b) =>
  JSON.stringify(Object.entries(a).sort()) === JSON.stringify(Object.entries(b).sort());

// --- The billing service's logic. ---

/** Links a customer we just created in Stripe, or adopts the one that won. */
async function linkOrAdopt(client, stripe, userId, newCustomer) {
  try {
    const { response } = await call(client, 'Link', { user_id: userId, stripe_customer_id: newCustomer });
    return { customer: response.mapping.stripe_customer_id, how: response.created ? 'created' : 'linked', info: null };
  } catch (err) {
    if (err.code === undefined) throw err;
    const { code, info } = failure(err);
    if (code === 'ALREADY_EXISTS' && info && info.reason === 'USER_ALREADY_LINKED') {
      // Another worker linked this user first: use its customer and drop ours.
      stripe.deleteCustomer(newCustomer);
      return { customer: info.metadata.stripeCustomerId, how: 'adopted', info };
    }
    throw err; // CUSTOMER_ALREADY_LINKED for a brand-new customer would be a bug
  }
}

/** The billing get-or-create: { customer, how, notFound ErrorInfo or null }. */
async function customerForUser(client, stripe, userId) {
  let notFound;
  try {
    const { response } = await call(client, 'Get', { user_id: userId });
    return { customer: response.mapping.stripe_customer_id, how: 'found', notFound: null };
  } catch (err) {
    if (err.code === undefined) throw err;
    const decoded = failure(err);
    if (decoded.code !== 'NOT_FOUND') throw err;
    notFound = decoded.info;
  }
  const { customer, how } = await linkOrAdopt(client, stripe, userId, stripe.createCustomer());
  return { customer, how, notFound };
}

// --- The steps, printed in a fixed format. ---

async function main(address, { credentials, options }) {
  const run = randomString('abcdefghijklmnopqrstuvwxyz0123456789', 8);
  const alice = `user-${run}-alice`;
  const bob = `user-${run}-bob`;
  const stripe = new FakeStripe();
  const state = {};
  const client = new CustomerMapping(address, credentials, options);
  const health = new Health(address, credentials, options);

  const steps = {
    async health() {
      const response = await new Promise((resolve, reject) =>
        health.Check({ service: SERVICE }, { deadline: Date.now() + DEADLINE_MS }, (err, r) =>
          err ? reject(err) : resolve(r),
        ),
      );
      check(response.status === 'SERVING', `status ${response.status}`);
      return ['health', { service: SERVICE, status: response.status }];
    },

    async 'get-missing-then-link-new'() {
      const { customer, how, notFound } = await customerForUser(client, stripe, alice);
      check(how === 'created', `expected a new link, got ${how}`);
      const missing = infoFields('NOT_FOUND', notFound, 'MAPPING_NOT_FOUND');
      check(sameJson(notFound.metadata, { userId: alice }), `metadata ${JSON.stringify(notFound.metadata)}`);
      check(stripe.customers.has(customer), 'linked a customer we did not create');
      state.customer = customer;
      return [
        ['get-missing', missing],
        ['link-new', { created: 'true', user: alice, customer }],
      ];
    },

    async 'get-existing'() {
      const { customer, how } = await customerForUser(client, stripe, alice);
      check(how === 'found' && customer === state.customer, `${how} ${customer}`);
      return ['get-existing', { user: alice, customer }];
    },

    async 'link-retry'() {
      const first = (await call(client, 'Get', { user_id: alice })).response;
      const { response } = await call(client, 'Link', { user_id: alice, stripe_customer_id: state.customer });
      check(response.created === false, 'a repeated Link must answer created=false');
      check(sameJson(response.mapping.create_time, first.mapping.create_time), 'create_time changed');
      return ['link-retry', { created: 'false', customer: response.mapping.stripe_customer_id }];
    },

    async 'link-race'() {
      // Another worker's Get also said NOT_FOUND and it linked alice first:
      // our freshly created Stripe customer loses, we adopt the winner.
      const ours = stripe.createCustomer();
      const { customer, how, info } = await linkOrAdopt(client, stripe, alice, ours);
      check(how === 'adopted', `expected to adopt, got ${how}`);
      const fields = infoFields('ALREADY_EXISTS', info, 'USER_ALREADY_LINKED');
      check(sameJson(info.metadata, { userId: alice, stripeCustomerId: state.customer }),
        `metadata ${JSON.stringify(info.metadata)}`);
      check(!stripe.customers.has(ours), 'our duplicate Stripe customer was not deleted');
      return ['link-race', { ...fields, adopted: customer }];
    },

    async 'link-customer-taken'() {
      const { info } = await expectError(
        () => call(client, 'Link', { user_id: bob, stripe_customer_id: state.customer }), 'ALREADY_EXISTS');
      const fields = infoFields('ALREADY_EXISTS', info, 'CUSTOMER_ALREADY_LINKED');
      check(sameJson(info.metadata, { userId: alice, stripeCustomerId: state.customer }),
        `metadata ${JSON.stringify(info.metadata)}`);
      return ['link-customer-taken', fields];
    },

    async 'webhook-get'() {
      // customer.subscription.updated for state.customer: whose is it?
      const { response } = await call(client, 'Get', { stripe_customer_id: state.customer });
      check(response.mapping.user_id === alice, `user ${response.mapping.user_id}`);
      return ['webhook-get', { customer: state.customer, user: response.mapping.user_id }];
    },

    async 'webhook-unknown'() {
      const unknown = stripe.createCustomer(); // made outside this billing service
      const { info } = await expectError(() => call(client, 'Get', { stripe_customer_id: unknown }), 'NOT_FOUND');
      const fields = infoFields('NOT_FOUND', info, 'MAPPING_NOT_FOUND');
      check(sameJson(info.metadata, { stripeCustomerId: unknown }), `metadata ${JSON.stringify(info.metadata)}`);
      return ['webhook-unknown', fields];
    },

    async invalid() {
      const { badRequest } = await expectError(
        () => call(client, 'Link', { user_id: 'user 42', stripe_customer_id: 'cus_' }), 'INVALID_ARGUMENT');
      check(badRequest !== null, 'no google.rpc.BadRequest detail');
      check(badRequest.field_violations.every((v) => v.description), 'a violation has no description');
      const fields = badRequest.field_violations.map((v) => v.field).sort();
      return ['invalid', { code: 'INVALID_ARGUMENT', fields: fields.join(',') }];
    },

    async 'invalid-no-key'() {
      const { badRequest } = await expectError(() => call(client, 'Get', {}), 'INVALID_ARGUMENT');
      check(badRequest !== null, 'no google.rpc.BadRequest detail');
      const fields = badRequest.field_violations.map((v) => v.field).sort();
      return ['invalid-no-key', { code: 'INVALID_ARGUMENT', fields: fields.join(',') }];
    },

    async 'request-id'() {
      const sentOk = `billing-${run}-ok`;
      const sentErr = `billing-${run}-err`;
      const { requestId: echoedOk } = await call(client, 'Get', { user_id: alice }, sentOk);
      const { err } = await expectError(() => call(client, 'Get', { user_id: bob }, sentErr), 'NOT_FOUND');
      const [echoedErr = null] = err.metadata.get('x-request-id');
      check(echoedOk === sentOk, `success echoed ${echoedOk}`);
      check(echoedErr === sentErr, `error echoed ${echoedErr}`);
      return ['request-id', { ok: echoedOk, error: echoedErr }];
    },

    async unlink() {
      // Account deletion: remove the mapping (and then, in real life, the customer).
      const { response } = await call(client, 'Unlink', { user_id: alice });
      check(response.mapping.stripe_customer_id === state.customer, 'unlinked another customer');
      return ['unlink', { user: alice, customer: response.mapping.stripe_customer_id }];
    },

    async 'unlink-retry'() {
      // A retried Unlink whose first attempt succeeded: NOT_FOUND means done.
      const { info } = await expectError(() => call(client, 'Unlink', { user_id: alice }), 'NOT_FOUND');
      const fields = infoFields('NOT_FOUND', info, 'MAPPING_NOT_FOUND');
      check(sameJson(info.metadata, { userId: alice }), `metadata ${JSON.stringify(info.metadata)}`);
      return ['unlink-retry', fields];
    },
  };

  let printed = 0;
  try {
    for (const [stepName, fn] of Object.entries(steps)) {
      let lines;
      try {
        lines = await fn();
      } catch (err) {
        const why = err.code !== undefined ? `${CODE_NAMES[err.code]}: ${err.details}` : err.message;
        console.log(`STEP ${stepName} FAIL ${why}`);
        return 1;
      }
      for (const [name, fields] of Array.isArray(lines[0]) ? lines : [lines]) {
        const shown = Object.entries(fields).map(([k, v]) => `${k}=${v}`).join(' ');
        console.log(`STEP ${name} OK ${shown}`);
        printed++;
      }
    }
  } finally {
    client.close();
    health.close();
  }
  console.log(`DONE ${printed} steps OK`);
  return 0;
}

const usage =
  'usage: node billing-flow.js [--cert tls.crt --key tls.key --ca ca.crt [--server-name NAME]] HOST:PORT';
let address;
let settings;
try {
  const { tls, positionals } = connect.parse(process.argv.slice(2));
  if (positionals.length !== 1) throw new Error('one HOST:PORT');
  address = positionals[0];
  settings = connect.channelSettings(tls);
} catch (err) {
  console.error(`${err.message}\n${usage}`);
  process.exit(2);
}
main(address, settings).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(err);
    process.exitCode = 1;
  },
);
