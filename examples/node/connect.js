// Opening a client to customer-mapping: plaintext, or mutual TLS as the
// deployment serves it. The same flags and environment variables as
// ../python/connect.py.
//
// The three files are those of a cert-manager Secret (and of the Secret
// customer-mapping-tls the server mounts): the client's certificate chain
// (tls.crt), its private key (tls.key), and the CA that signed the server's
// certificate (ca.crt). The server must trust the CA that signed the
// client's certificate, and its policy must name the certificate (a DNS or
// URI SAN).
//
//   --cert FILE         CUSTOMER_MAPPING_TLS_CERT
//   --key FILE          CUSTOMER_MAPPING_TLS_KEY
//   --ca FILE           CUSTOMER_MAPPING_TLS_CA
//   --server-name NAME  CUSTOMER_MAPPING_TLS_SERVER_NAME   the name to verify
//                       the server's certificate against, when it is not the
//                       host in HOST:PORT (e.g. through kubectl port-forward:
//                       customer-mapping.customer-mapping.svc)
//
// With none of them the channel is plaintext (a local server, or a mesh that
// encrypts). --ca alone verifies the server without presenting a certificate.
'use strict';

const fs = require('fs');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');

const FLAGS = {
  cert: 'CUSTOMER_MAPPING_TLS_CERT',
  key: 'CUSTOMER_MAPPING_TLS_KEY',
  ca: 'CUSTOMER_MAPPING_TLS_CA',
  'server-name': 'CUSTOMER_MAPPING_TLS_SERVER_NAME',
};

// Parses `argv` (without node and the script): the TLS flags, each
// defaulting to its environment variable, the program's own `options` (in
// util.parseArgs form; their values come back in `values`), and the
// positional arguments.
function parse(argv, options = {}) {
  const all = { ...options, ...Object.fromEntries(Object.keys(FLAGS).map((flag) => [flag, { type: 'string' }])) };
  const { values, positionals } = parseArgs({ args: argv, options: all, allowPositionals: true });
  const tls = {};
  for (const [flag, variable] of Object.entries(FLAGS)) {
    tls[flag] = values[flag] ?? process.env[variable] ?? null;
  }
  return { tls, positionals, values };
}

// The credentials and channel options for `tls`, refusing half a
// configuration: a certificate without its key (or the reverse), or TLS
// settings without a CA.
function channelSettings(tls) {
  if (Boolean(tls.cert) !== Boolean(tls.key)) {
    throw new Error('--cert and --key go together (CUSTOMER_MAPPING_TLS_CERT, _KEY)');
  }
  if ((tls.cert || tls['server-name']) && !tls.ca) {
    throw new Error('--ca is needed to verify the server (CUSTOMER_MAPPING_TLS_CA)');
  }
  if (!tls.ca) return { credentials: grpc.credentials.createInsecure(), options: {} };
  const credentials = grpc.credentials.createSsl(
    fs.readFileSync(tls.ca),
    tls.key ? fs.readFileSync(tls.key) : null,
    tls.cert ? fs.readFileSync(tls.cert) : null,
  );
  const options = {};
  if (tls['server-name']) {
    options['grpc.ssl_target_name_override'] = tls['server-name'];
    options['grpc.default_authority'] = tls['server-name'];
  }
  return { credentials, options };
}

module.exports = { parse, channelSettings };
