"""Opening a channel to customer-mapping: plaintext, or mutual TLS as the
deployment serves it.

The three files are those of a cert-manager Secret (and of the Secret
customer-mapping-tls the server mounts): the client's certificate chain
(tls.crt), its private key (tls.key), and the CA that signed the server's
certificate (ca.crt). The server must trust the CA that signed the client's
certificate, and its policy must name the certificate (a DNS or URI SAN).

Each flag has an environment variable, for a container that mounts the
Secret:

  --cert FILE         CUSTOMER_MAPPING_TLS_CERT
  --key FILE          CUSTOMER_MAPPING_TLS_KEY
  --ca FILE           CUSTOMER_MAPPING_TLS_CA
  --server-name NAME  CUSTOMER_MAPPING_TLS_SERVER_NAME   the name to verify
                      the server's certificate against, when it is not the
                      host in HOST:PORT (e.g. through kubectl port-forward:
                      customer-mapping.customer-mapping.svc)

With none of them the channel is plaintext (a local server, or a mesh that
encrypts). --ca alone verifies the server without presenting a certificate.
"""

import argparse
import os

import grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--cert", default=env("CUSTOMER_MAPPING_TLS_CERT"),
                        help="client certificate chain, PEM (tls.crt)")
    parser.add_argument("--key", default=env("CUSTOMER_MAPPING_TLS_KEY"),
                        help="client private key, PEM (tls.key)")
    parser.add_argument("--ca", default=env("CUSTOMER_MAPPING_TLS_CA"),
                        help="CA of the server's certificate, PEM (ca.crt)")
    parser.add_argument("--server-name", default=env("CUSTOMER_MAPPING_TLS_SERVER_NAME"),
                        help="name to verify the server's certificate against")


def open_channel(address: str, args: argparse.Namespace) -> grpc.Channel:
    """A channel to `address`, refusing half a configuration: a certificate
    without its key (or the reverse), or TLS settings without a CA."""
    if bool(args.cert) != bool(args.key):
        raise SystemExit("--cert and --key go together (CUSTOMER_MAPPING_TLS_CERT, _KEY)")
    if (args.cert or args.server_name) and not args.ca:
        raise SystemExit("--ca is needed to verify the server (CUSTOMER_MAPPING_TLS_CA)")
    if not args.ca:
        return grpc.insecure_channel(address)

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key) if args.key else None,
        certificate_chain=read(args.cert) if args.cert else None,
    )
    options = []
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    return grpc.secure_channel(address, credentials, options=options)
