#!/usr/bin/env node
// Get-or-create a user's Stripe customer with PrepareLink: no orphans left (Node.js).
//
// Usage: node get-or-create.js [--stripe URL] [--cert tls.crt --key tls.key
//                               --ca ca.crt [--server-name NAME]] HOST:PORT
//
// --stripe is the Stripe API to call (default http://127.0.0.1:8420: a
// localstripe, see ../python/localstripe_serve.py), with the secret key in
// STRIPE_API_KEY (default sk_test_localstripe). The TLS flags are those of
// billing-flow.js (connect.js).
//
// The flow (customer_mapping.proto, rpc PrepareLink):
//   1. PrepareLink(user, account): a `mapping` is the answer.
//   2. A `creation`: create the customer in Stripe with Idempotency-Key =
//      creation.idempotency_key and metadata = creation.metadata, exactly:
//      every caller sends the same parameters, so every concurrent caller
//      gets the same customer from Stripe.
//   3. Link(user, customer, account, prepared_generation = creation.generation).
//      ALREADY_EXISTS: someone else's customer won; delete ours, Get theirs.
//      FAILED_PRECONDITION STALE_PREPARATION: the user was unlinked
//      meanwhile; delete ours and start again at 1.
//
// Prints `STEP <name> OK key=value ...` per step, then `DONE get-or-create OK`;
// on any surprise `STEP <name> FAIL <why>` and exit 1: the same lines as
// ../python/get_or_create.py. Retries of UNAVAILABLE and the like are left
// out here: billing-flow.js shows them.
'use strict';

const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const Stripe = require('stripe');
const connect = require('./connect');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const DEADLINE_MS = 5000;
const MAX_ROUNDS = 3; // PrepareLink -> create -> Link rounds lost to concurrent Unlinks

const definition = protoLoader.loadSync('customermapping/v1/customer_mapping.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  defaults: true,
  oneofs: true, // PrepareLinkResponse.outcome: 'mapping' or 'creation'
  longs: String, // int64 generation as a string, passed back as it is
  enums: String,
});
const { CustomerMapping } = grpc.loadPackageDefinition(definition).customermapping.v1;

// google.rpc.ErrorInfo from the google.rpc.Status in grpc-status-details-bin
// (billing-flow.js decodes BadRequest too).
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, target) => (path.isAbsolute(target) ? target : path.join(PROTO_ROOT, target));
rpcTypes.loadSync('google/rpc/error_details.proto', { keepCase: true });
rpcTypes.loadSync('google/protobuf/any.proto', { keepCase: true }); // bundled with protobufjs
protobuf.parse(`syntax = "proto3"; package google.rpc; import "google/protobuf/any.proto";
  message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }`, rpcTypes,
{ keepCase: true });
rpcTypes.resolveAll();
const RpcStatus = rpcTypes.lookupType('google.rpc.Status');
const ErrorInfo = rpcTypes.lookupType('google.rpc.ErrorInfo');

function errorInfo(err) {
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  const detail = bin && RpcStatus.decode(bin).details.find((d) => d.type_url.endsWith('/google.rpc.ErrorInfo'));
  return detail ? ErrorInfo.toObject(ErrorInfo.decode(detail.value)) : null;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

class StepFailed extends Error {}

function check(condition, why) {
  if (!condition) throw new StepFailed(why);
}

/**
 * The user's customer in `account` ('' for the platform's own). Resolves to
 * { mapping, how, creation, orphans, rounds }: how is found | created |
 * linked (the same customer, linked by another caller) | adopted (another's
 * won); creation is the last one used; orphans the customers we created and
 * deleted.
 */
async function getOrCreate(client, stripe, userId, account = '', beforeLink = null) {
  const stripeOptions = account ? { stripeAccount: account } : {}; // the Stripe-Account header
  const outcome = { mapping: null, how: '', creation: null, orphans: [], rounds: 0 };
  while (outcome.rounds < MAX_ROUNDS) {
    outcome.rounds += 1;
    const prepared = await unary(client, 'PrepareLink', { user_id: userId, stripe_account: account });
    if (prepared.outcome === 'mapping') return { ...outcome, mapping: prepared.mapping, how: 'found' };
    const creation = (outcome.creation = prepared.creation);
    const customer = await stripe.customers.create(
      { metadata: creation.metadata }, // exactly this, nothing caller-specific
      { idempotencyKey: creation.idempotency_key, ...stripeOptions },
    );
    if (beforeLink) await beforeLink(); // only for this demo: lets another caller in here
    try {
      const linked = await unary(client, 'Link', {
        user_id: userId,
        stripe_customer_id: customer.id,
        stripe_account: account,
        prepared_generation: creation.generation,
      });
      return { ...outcome, mapping: linked.mapping, how: linked.created ? 'created' : 'linked' };
    } catch (err) {
      if (err.code === undefined) throw err;
      const reason = errorInfo(err)?.reason;
      if (err.code === grpc.status.ALREADY_EXISTS && reason === 'USER_ALREADY_LINKED') {
        await stripe.customers.del(customer.id, {}, stripeOptions); // ours lost
        outcome.orphans.push(customer.id);
        const got = await unary(client, 'Get', { user_id: userId, stripe_account: account });
        return { ...outcome, mapping: got.mapping, how: 'adopted' };
      }
      if (err.code === grpc.status.FAILED_PRECONDITION && reason === 'STALE_PREPARATION') {
        await stripe.customers.del(customer.id, {}, stripeOptions); // made for a past generation
        outcome.orphans.push(customer.id);
        continue;
      }
      throw err;
    }
  }
  throw new StepFailed(`${userId}: no customer after ${MAX_ROUNDS} rounds of concurrent Unlinks`);
}

// --- The demonstration, printed in a fixed format. ---

/** The live customers in Stripe whose metadata names this user and account. */
async function stripeCustomers(stripe, userId, account = '') {
  const found = [];
  for await (const customer of stripe.customers.list({ limit: 100 }, account ? { stripeAccount: account } : {})) {
    const { customer_mapping_user_id: user, customer_mapping_stripe_account: acct = '' } = customer.metadata;
    if (user === userId && acct === account) found.push(customer.id);
  }
  return found;
}

const sameJson = (a, b) => JSON.stringify(Object.entries(a).sort()) === JSON.stringify(Object.entries(b).sort());

async function main(client, stripe) {
  const run = crypto.randomBytes(4).toString('hex');
  const [alice, bob, carol] = ['alice', 'bob', 'carol'].map((name) => `user-${run}-${name}`);
  const account = `acct_1${run}`;
  const state = {};

  const metadata = (name) => async () => {
    const got = state[name];
    const { stripe_customer_id: id, stripe_account: acct } = got.mapping;
    const stored = (await stripe.customers.retrieve(id, {}, acct ? { stripeAccount: acct } : {})).metadata;
    check(sameJson(stored, got.creation.metadata), `metadata ${JSON.stringify(stored)}`);
    check(stored.customer_mapping_user_id === alice, 'no customer_mapping_user_id');
    check(stored.customer_mapping_generation === String(got.creation.generation), 'no customer_mapping_generation');
    return { customer: id, ...Object.fromEntries(Object.entries(stored).sort()) };
  };

  const steps = {
    async first() {
      const got = await getOrCreate(client, stripe, alice);
      check(got.how === 'created', `how=${got.how}`);
      const live = await stripeCustomers(stripe, alice);
      check(live.length === 1 && live[0] === got.mapping.stripe_customer_id, 'not exactly one customer');
      state.first = got;
      const { stripe_customer_id: customer } = got.mapping;
      return { created: 'true', user: alice, customer, generation: got.creation.generation };
    },

    async again() {
      const got = await getOrCreate(client, stripe, alice);
      const count = (await stripeCustomers(stripe, alice)).length; // localstripe ignores keys: a create would add one
      check(got.how === 'found', `how=${got.how}`);
      check(got.mapping.stripe_customer_id === state.first.mapping.stripe_customer_id, 'another customer');
      check(count === 1, `${count} customers in Stripe`);
      return { found: 'true', customer: got.mapping.stripe_customer_id, stripe_customers: count };
    },

    async connected() {
      // On the connected account: the Stripe-Account header, set by the
      // stripeAccount option. localstripe ignores that header (one store for
      // all accounts); the metadata names the account all the same.
      const got = await getOrCreate(client, stripe, alice, account);
      const platform = state.first.mapping.stripe_customer_id;
      check(got.how === 'created', `how=${got.how}`);
      check(got.mapping.stripe_account === account, `account '${got.mapping.stripe_account}'`);
      check(got.mapping.stripe_customer_id !== platform, "the platform's customer");
      const still = (await unary(client, 'Get', { user_id: alice })).mapping;
      check(still.stripe_customer_id === platform, "the platform's mapping changed");
      state.connected = got;
      return { created: 'true', account, customer: got.mapping.stripe_customer_id, platform_customer: platform };
    },

    async 'after-unlink'() {
      await unary(client, 'Unlink', { user_id: alice });
      const got = await getOrCreate(client, stripe, alice);
      check(got.how === 'created', `how=${got.how}`);
      check(got.creation.idempotency_key !== state.first.creation.idempotency_key, 'the same idempotency key');
      check(got.mapping.stripe_customer_id !== state.first.mapping.stripe_customer_id, 'the old customer');
      state.afterUnlink = got;
      const { stripe_customer_id: customer } = got.mapping;
      return { created: 'true', customer, generation: got.creation.generation, new_key: 'true' };
    },

    metadata: metadata('afterUnlink'),
    'metadata-connected': metadata('connected'),

    async race() {
      // Another caller gets in between our create and our Link, with the
      // same key. Stripe would give it our customer (its Link: created=true,
      // ours: created=false); localstripe ignores the key and makes another
      // customer, so its Link wins and ours gets ALREADY_EXISTS.
      const theirs = [];
      const got = await getOrCreate(client, stripe, bob, '', async () => {
        theirs.push(await getOrCreate(client, stripe, bob));
      });
      const live = await stripeCustomers(stripe, bob);
      check(got.how === 'adopted' || got.how === 'linked', `how=${got.how}`);
      check(got.creation.idempotency_key === theirs[0].creation.idempotency_key, 'two keys for one user');
      check(got.mapping.stripe_customer_id === theirs[0].mapping.stripe_customer_id, 'two customers');
      check(live.length === 1 && live[0] === got.mapping.stripe_customer_id, `customers in Stripe: ${live}`);
      return {
        how: got.how,
        customer: got.mapping.stripe_customer_id,
        same_key: 'true',
        orphans_deleted: got.orphans.length,
        stripe_customers: live.length,
      };
    },

    async stale() {
      // Between our create and our Link, another caller links carol and
      // carol is unlinked: our Link is refused, our customer deleted, and
      // the second round makes carol's customer of generation 1.
      const got = await getOrCreate(client, stripe, carol, '', async () => {
        if (state.carol) return; // in the first round only
        state.carol = await getOrCreate(client, stripe, carol);
        await unary(client, 'Unlink', { user_id: carol });
      });
      const live = await stripeCustomers(stripe, carol);
      check(got.how === 'created' && got.rounds === 2, `how=${got.how} rounds=${got.rounds}`);
      check(got.orphans.length === 1 && !live.includes(got.orphans[0]), `orphans ${got.orphans}`);
      const { how, rounds, creation } = got;
      return { how, rounds, generation: creation.generation, orphans_deleted: got.orphans.length };
    },
  };

  for (const [name, fn] of Object.entries(steps)) {
    let fields;
    try {
      fields = await fn();
    } catch (err) {
      const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
      console.log(`STEP ${name} FAIL ${err.details !== undefined && code ? `${code}: ${err.details}` : err.message}`);
      return 1;
    }
    console.log(`STEP ${name} OK ${Object.entries(fields).map(([k, v]) => `${k}=${v}`).join(' ')}`);
  }
  console.log('DONE get-or-create OK');
  return 0;
}

const usage =
  'usage: node get-or-create.js [--stripe URL]\n' +
  '                             [--cert tls.crt --key tls.key --ca ca.crt [--server-name NAME]] HOST:PORT';
let address;
let settings;
let stripeUrl;
try {
  const { tls, positionals, values } = connect.parse(process.argv.slice(2), { stripe: { type: 'string' } });
  stripeUrl = new URL(values.stripe ?? 'http://127.0.0.1:8420');
  if (positionals.length !== 1) throw new Error('one HOST:PORT');
  address = positionals[0];
  settings = connect.channelSettings(tls);
} catch (err) {
  console.error(`${err.message}\n${usage}`);
  process.exit(2);
}
const stripe = new Stripe(process.env.STRIPE_API_KEY ?? 'sk_test_localstripe', {
  host: stripeUrl.hostname,
  port: stripeUrl.port || (stripeUrl.protocol === 'http:' ? 80 : 443),
  protocol: stripeUrl.protocol.replace(':', ''),
});
const client = new CustomerMapping(address, settings.credentials, settings.options);
main(client, stripe)
  .then((code) => {
    process.exitCode = code;
  })
  .catch((err) => {
    console.error(err);
    process.exitCode = 1;
  })
  .finally(() => client.close());
