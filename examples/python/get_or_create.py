"""Get-or-create a user's Stripe customer with PrepareLink: no orphans left.

Usage: python get_or_create.py [--stripe URL] [--cert tls.crt --key tls.key
                               --ca ca.crt [--server-name NAME]] HOST:PORT

--stripe is the Stripe API to call (default http://127.0.0.1:8420: a
localstripe, see localstripe_serve.py), with the secret key in
STRIPE_API_KEY (default sk_test_localstripe). The TLS flags are those of
billing_flow.py (connect.py).

The flow (customer_mapping.proto, rpc PrepareLink):
  1. PrepareLink(user, account): a `mapping` is the answer.
  2. A `creation`: create the customer in Stripe with Idempotency-Key =
     creation.idempotency_key and metadata = creation.metadata, exactly:
     every caller sends the same parameters, so every concurrent caller gets
     the same customer from Stripe.
  3. Link(user, customer, account, prepared_generation=creation.generation).
     ALREADY_EXISTS: someone else's customer won; delete ours, Get theirs.
     FAILED_PRECONDITION STALE_PREPARATION: the user was unlinked meanwhile;
     delete ours and start again at 1.

Prints `STEP <name> OK key=value ...` per step, then `DONE get-or-create OK`;
on any surprise `STEP <name> FAIL <why>` and exit 1. Retries of UNAVAILABLE
and the like are left out here: billing_flow.py shows them.
"""

import argparse
import dataclasses
import os
import random
import string
import sys

import grpc
import stripe
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import connect
import generate

sys.path.insert(0, generate.generate())
from customermapping.v1 import customer_mapping_pb2 as pb  # noqa: E402
from customermapping.v1 import customer_mapping_pb2_grpc as pb_grpc  # noqa: E402

DEADLINE_SECONDS = 5.0
MAX_ROUNDS = 3  # PrepareLink -> create -> Link rounds lost to concurrent Unlinks


class StepFailed(Exception):
    pass


def check(condition, why):
    if not condition:
        raise StepFailed(why)


def error_info(err):
    """The google.rpc.ErrorInfo detail of a failed call, or None."""
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


@dataclasses.dataclass
class Outcome:
    mapping: pb.Mapping
    how: str  # found | created | linked (same customer, linked by another) | adopted (another's won)
    creation: pb.CustomerCreation = None  # the last one used
    orphans: list = dataclasses.field(default_factory=list)  # customers we created and deleted
    rounds: int = 0


def get_or_create(stub, client, user_id, account="", before_link=None):
    """The user's customer in `account` ("" for the platform's own)."""
    stripe_options = {"stripe_account": account} if account else {}  # the Stripe-Account header
    outcome = Outcome(mapping=None, how="")
    while outcome.rounds < MAX_ROUNDS:
        outcome.rounds += 1
        prepared = stub.PrepareLink(pb.PrepareLinkRequest(user_id=user_id, stripe_account=account),
                                    timeout=DEADLINE_SECONDS)
        if prepared.WhichOneof("outcome") == "mapping":
            outcome.mapping, outcome.how = prepared.mapping, "found"
            return outcome
        creation = outcome.creation = prepared.creation
        customer = client.v1.customers.create(
            params={"metadata": dict(creation.metadata)},  # exactly this, nothing caller-specific
            options={"idempotency_key": creation.idempotency_key, **stripe_options},
        )
        if before_link:
            before_link()  # only for this demo: lets another caller in here
        try:
            linked = stub.Link(pb.LinkRequest(user_id=user_id, stripe_customer_id=customer.id,
                                              stripe_account=account,
                                              prepared_generation=creation.generation),
                               timeout=DEADLINE_SECONDS)
            outcome.mapping, outcome.how = linked.mapping, "created" if linked.created else "linked"
            return outcome
        except grpc.RpcError as err:
            info = error_info(err)
            reason = info.reason if info else ""
            if err.code() == grpc.StatusCode.ALREADY_EXISTS and reason == "USER_ALREADY_LINKED":
                client.v1.customers.delete(customer.id, options=stripe_options)  # ours lost
                outcome.orphans.append(customer.id)
                got = stub.Get(pb.GetRequest(user_id=user_id, stripe_account=account), timeout=DEADLINE_SECONDS)
                outcome.mapping, outcome.how = got.mapping, "adopted"
                return outcome
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason == "STALE_PREPARATION":
                client.v1.customers.delete(customer.id, options=stripe_options)  # made for a past generation
                outcome.orphans.append(customer.id)
                continue
            raise
    raise StepFailed(f"{user_id}: no customer after {MAX_ROUNDS} rounds of concurrent Unlinks")


# ---------------------------------------------------------------------------
# The demonstration, printed in a fixed format.


def stripe_customers(client, user_id, account=""):
    """The live customers in Stripe whose metadata names this user and account."""
    options = {"stripe_account": account} if account else {}
    found = []
    for customer in client.v1.customers.list(params={"limit": 100}, options=options).auto_paging_iter():
        metadata = customer.metadata.to_dict()
        if (metadata.get("customer_mapping_user_id") == user_id
                and metadata.get("customer_mapping_stripe_account", "") == account):
            found.append(customer.id)
    return found


def main(stub, client):
    run = "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
    alice, bob, carol = (f"user-{run}-{name}" for name in ("alice", "bob", "carol"))
    account = f"acct_1{run}"
    state = {}

    def first():
        got = get_or_create(stub, client, alice)
        check(got.how == "created", f"how={got.how}")
        check(stripe_customers(client, alice) == [got.mapping.stripe_customer_id], "not exactly one customer")
        state["first"] = got
        return {"created": "true", "user": alice, "customer": got.mapping.stripe_customer_id,
                "generation": got.creation.generation}

    def again():
        got = get_or_create(stub, client, alice)
        count = len(stripe_customers(client, alice))  # localstripe ignores keys: a create would add one
        check(got.how == "found", f"how={got.how}")
        check(got.mapping.stripe_customer_id == state["first"].mapping.stripe_customer_id, "another customer")
        check(count == 1, f"{count} customers in Stripe")
        return {"found": "true", "customer": got.mapping.stripe_customer_id, "stripe_customers": count}

    def connected():
        # On the connected account: the Stripe-Account header, set by the
        # stripe_account option. localstripe ignores that header (one store
        # for all accounts); the metadata names the account all the same.
        got = get_or_create(stub, client, alice, account)
        platform = state["first"].mapping.stripe_customer_id
        check(got.how == "created", f"how={got.how}")
        check(got.mapping.stripe_account == account, f"account {got.mapping.stripe_account!r}")
        check(got.mapping.stripe_customer_id != platform, "the platform's customer")
        still = stub.Get(pb.GetRequest(user_id=alice), timeout=DEADLINE_SECONDS).mapping
        check(still.stripe_customer_id == platform, "the platform's mapping changed")
        state["connected"] = got
        return {"created": "true", "account": account, "customer": got.mapping.stripe_customer_id,
                "platform_customer": platform}

    def after_unlink():
        stub.Unlink(pb.UnlinkRequest(user_id=alice), timeout=DEADLINE_SECONDS)
        got = get_or_create(stub, client, alice)
        check(got.how == "created", f"how={got.how}")
        old = state["first"]
        check(got.creation.idempotency_key != old.creation.idempotency_key, "the same idempotency key")
        check(got.mapping.stripe_customer_id != old.mapping.stripe_customer_id, "the old customer")
        state["after_unlink"] = got
        return {"created": "true", "customer": got.mapping.stripe_customer_id,
                "generation": got.creation.generation, "new_key": "true"}

    def metadata(name):
        def step():
            got = state[name]
            stored = client.v1.customers.retrieve(
                got.mapping.stripe_customer_id,
                options={"stripe_account": got.mapping.stripe_account} if got.mapping.stripe_account else {},
            ).metadata.to_dict()
            check(stored == dict(got.creation.metadata), f"metadata {stored} != {dict(got.creation.metadata)}")
            check(stored.get("customer_mapping_user_id") == alice, "no customer_mapping_user_id")
            check(stored.get("customer_mapping_generation") == str(got.creation.generation),
                  "no customer_mapping_generation")
            return {"customer": got.mapping.stripe_customer_id, **dict(sorted(stored.items()))}
        return step

    def race():
        # Another caller gets in between our create and our Link, with the
        # same key. Stripe would give it our customer (its Link: created=true,
        # ours: created=false); localstripe ignores the key and makes another
        # customer, so its Link wins and ours gets ALREADY_EXISTS.
        theirs = []
        got = get_or_create(stub, client, bob, before_link=lambda: theirs.append(get_or_create(stub, client, bob)))
        winner = theirs[0]
        live = stripe_customers(client, bob)
        check(got.how in ("adopted", "linked"), f"how={got.how}")
        check(got.creation.idempotency_key == winner.creation.idempotency_key, "two keys for one user")
        check(got.mapping.stripe_customer_id == winner.mapping.stripe_customer_id, "two customers")
        check(live == [got.mapping.stripe_customer_id], f"customers in Stripe: {live}")
        return {"how": got.how, "customer": got.mapping.stripe_customer_id, "same_key": "true",
                "orphans_deleted": len(got.orphans), "stripe_customers": len(live)}

    def stale():
        # Between our create and our Link, another caller links carol and
        # carol is unlinked: our Link is refused, our customer deleted, and
        # the second round makes carol's customer of generation 1.
        def link_and_unlink():
            if "carol" not in state:  # in the first round only
                state["carol"] = get_or_create(stub, client, carol)
                stub.Unlink(pb.UnlinkRequest(user_id=carol), timeout=DEADLINE_SECONDS)
        got = get_or_create(stub, client, carol, before_link=link_and_unlink)
        live = stripe_customers(client, carol)
        check(got.how == "created" and got.rounds == 2, f"how={got.how} rounds={got.rounds}")
        check(len(got.orphans) == 1 and got.orphans[0] not in live, f"orphans {got.orphans}")
        return {"how": got.how, "rounds": got.rounds, "generation": got.creation.generation,
                "orphans_deleted": len(got.orphans)}

    steps = [("first", first), ("again", again), ("connected", connected), ("after-unlink", after_unlink),
             ("metadata", metadata("after_unlink")), ("metadata-connected", metadata("connected")),
             ("race", race), ("stale", stale)]
    for name, fn in steps:
        try:
            fields = fn()
        except (StepFailed, grpc.RpcError, stripe.StripeError) as exc:
            why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
            print(f"STEP {name} FAIL {why}", flush=True)
            return 1
        print(f"STEP {name} OK " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
    print("DONE get-or-create OK", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Get-or-create Stripe customers with PrepareLink.")
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("--stripe", default="http://127.0.0.1:8420", metavar="URL",
                        help="the Stripe API (default: a localstripe on 127.0.0.1:8420)")
    connect.add_arguments(parser)
    args = parser.parse_args()
    stripe_client = stripe.StripeClient(os.environ.get("STRIPE_API_KEY", "sk_test_localstripe"),
                                        base_addresses={"api": args.stripe})
    with connect.open_channel(args.address, args) as channel:
        sys.exit(main(pb_grpc.CustomerMappingStub(channel), stripe_client))
