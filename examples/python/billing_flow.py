"""A billing service's use of customermapping.v1, step by step.

Usage: python billing_flow.py [--cert tls.crt --key tls.key --ca ca.crt
                               [--server-name NAME]] HOST:PORT

Plaintext without the TLS flags; with them, mutual TLS as the deployment
serves it (connect.py: the flags, their environment variables).

Shows what a caller in Python does with this service:
  - get-or-create the Stripe customer of a user (Get; on NOT_FOUND create a
    customer in Stripe and Link it; on ALREADY_EXISTS adopt the customer that
    won, read from the google.rpc.ErrorInfo detail),
  - the Stripe webhook path (Get by stripe_customer_id),
  - decoding google.rpc.BadRequest for an invalid request,
  - grpc.health.v1 health checking, deadlines, retries and x-request-id.

Prints one line per step, `STEP <name> OK key=value ...`, then
`DONE <n> steps OK`; on any surprise `STEP <name> FAIL <why>` and exit 1.
docs/errors.md explains every status code and how to retry it.
"""

import argparse
import random
import string
import sys
import time
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import connect
import generate

sys.path.insert(0, generate.generate())
from customermapping.v1 import customer_mapping_pb2 as pb  # noqa: E402
from customermapping.v1 import customer_mapping_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "customermapping.v1.CustomerMapping"
DOMAIN = "customermapping.v1"
DEADLINE_SECONDS = 5.0  # always set one: a call without a deadline can hang forever
MAX_ATTEMPTS = 5


class StepFailed(Exception):
    pass


def check(condition, why):
    if not condition:
        raise StepFailed(why)


# ---------------------------------------------------------------------------
# Stand-in for the Stripe API (a real billing service calls stripe.Customer.*).


class FakeStripe:
    def __init__(self):
        self.customers = set()

    def create_customer(self):
        alphabet = string.ascii_letters + string.digits
        customer = "cus_" + "".join(random.choices(alphabet, k=14))
        self.customers.add(customer)
        return customer

    def delete_customer(self, customer):
        self.customers.discard(customer)


# ---------------------------------------------------------------------------
# Calling the service: deadline, request id, retries (see docs/errors.md).


def call(rpc, request, request_id=None):
    """Calls `rpc` with a deadline and an x-request-id, retrying what is safe.

    Link, Get and Unlink are idempotent in effect, so UNAVAILABLE (backoff),
    ABORTED (immediately, with jitter) and DEADLINE_EXCEEDED may be retried;
    INTERNAL at most once. The same request id is sent on every attempt so
    the server log ties them together. Returns (response, request id echoed).
    """
    request_id = request_id or f"billing-{uuid.uuid4()}"
    internal_retried = False
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            response, grpc_call = rpc.with_call(
                request,
                timeout=DEADLINE_SECONDS,
                metadata=[("x-request-id", request_id)],
            )
            return response, metadata_value(grpc_call.initial_metadata(), "x-request-id")
        except grpc.RpcError as err:
            code = err.code()
            if attempt == MAX_ATTEMPTS:
                raise
            if code == grpc.StatusCode.ABORTED:
                time.sleep(random.uniform(0, 0.05))
            elif code == grpc.StatusCode.UNAVAILABLE:
                time.sleep(min(0.1 * 2 ** (attempt - 1), 3.0) * random.uniform(0.5, 1.0))
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                pass  # outcome unknown; repeating an idempotent call is safe
            elif code == grpc.StatusCode.INTERNAL and not internal_retried:
                internal_retried = True
            else:
                raise
    raise AssertionError("unreachable")


def metadata_value(metadata, key):
    for k, v in metadata or ():
        if k == key:
            return v
    return None


def failure(err):
    """Decodes an RpcError: (code name, ErrorInfo or None, BadRequest or None)."""
    info = bad_request = None
    status = rpc_status.from_call(err)  # google.rpc.Status from grpc-status-details-bin
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
    return err.code().name, info, bad_request


def expect_error(fn, code):
    """Runs fn, which must fail with `code`; returns (ErrorInfo, BadRequest, err)."""
    try:
        fn()
    except grpc.RpcError as err:
        got, info, bad_request = failure(err)
        check(got == code, f"expected {code}, got {got}: {err.details()}")
        return info, bad_request, err
    raise StepFailed(f"expected {code}, the call succeeded")


def info_fields(code, info, reason):
    """Checks an ErrorInfo detail; returns what a step prints about it."""
    check(info is not None, "no google.rpc.ErrorInfo detail")
    check(info.reason == reason, f"reason {info.reason}, expected {reason}")
    check(info.domain == DOMAIN, f"domain {info.domain}, expected {DOMAIN}")
    return {"code": code, "reason": info.reason, "domain": info.domain, **dict(sorted(info.metadata.items()))}


# ---------------------------------------------------------------------------
# The billing service's logic.


def link_or_adopt(stub, stripe, user_id, new_customer):
    """Links a customer we just created in Stripe, or adopts the one that won.

    Returns (customer, how, ErrorInfo or None)."""
    try:
        response, _ = call(stub.Link, pb.LinkRequest(user_id=user_id, stripe_customer_id=new_customer))
        return response.mapping.stripe_customer_id, "created" if response.created else "linked", None
    except grpc.RpcError as err:
        code, info, _ = failure(err)
        if code == "ALREADY_EXISTS" and info is not None and info.reason == "USER_ALREADY_LINKED":
            # Another worker linked this user first: use its customer and drop ours.
            stripe.delete_customer(new_customer)
            return info.metadata["stripeCustomerId"], "adopted", info
        raise  # CUSTOMER_ALREADY_LINKED for a brand-new customer would be a bug


def customer_for_user(stub, stripe, user_id):
    """The billing get-or-create: (customer, how, NOT_FOUND ErrorInfo or None)."""
    try:
        response, _ = call(stub.Get, pb.GetRequest(user_id=user_id))
        return response.mapping.stripe_customer_id, "found", None
    except grpc.RpcError as err:
        code, not_found, _ = failure(err)
        if code != "NOT_FOUND":
            raise
    customer, how, _ = link_or_adopt(stub, stripe, user_id, stripe.create_customer())
    return customer, how, not_found


# ---------------------------------------------------------------------------
# The steps, printed in a fixed format.


def main(channel):
    run = "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
    alice, bob = f"user-{run}-alice", f"user-{run}-bob"
    stripe = FakeStripe()
    steps = []
    state = {}

    def step(fn):
        steps.append(fn)
        return fn

    stub = pb_grpc.CustomerMappingStub(channel)
    health_stub = health_pb2_grpc.HealthStub(channel)

    @step
    def health():
        response = health_stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=DEADLINE_SECONDS)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        check(status == "SERVING", f"status {status}")
        return "health", {"service": SERVICE, "status": status}

    @step
    def get_missing_then_link_new():
        customer, how, not_found = customer_for_user(stub, stripe, alice)
        check(how == "created", f"expected a new link, got {how}")
        missing = info_fields("NOT_FOUND", not_found, "MAPPING_NOT_FOUND")
        check(dict(not_found.metadata) == {"userId": alice}, f"metadata {dict(not_found.metadata)}")
        check(customer in stripe.customers, "linked a customer we did not create")
        state["customer"] = customer
        return [("get-missing", missing),
                ("link-new", {"created": "true", "user": alice, "customer": customer})]

    @step
    def get_existing():
        customer, how, _ = customer_for_user(stub, stripe, alice)
        check(how == "found" and customer == state["customer"], f"{how} {customer}")
        return "get-existing", {"user": alice, "customer": customer}

    @step
    def link_retry():
        first, _ = call(stub.Get, pb.GetRequest(user_id=alice))
        response, _ = call(stub.Link, pb.LinkRequest(user_id=alice, stripe_customer_id=state["customer"]))
        check(not response.created, "a repeated Link must answer created=false")
        check(response.mapping.create_time == first.mapping.create_time, "create_time changed")
        return "link-retry", {"created": "false", "customer": response.mapping.stripe_customer_id}

    @step
    def link_race():
        # Another worker's Get also said NOT_FOUND and it linked alice first:
        # our freshly created Stripe customer loses, we adopt the winner.
        ours = stripe.create_customer()
        customer, how, info = link_or_adopt(stub, stripe, alice, ours)
        check(how == "adopted", f"expected to adopt, got {how}")
        fields = info_fields("ALREADY_EXISTS", info, "USER_ALREADY_LINKED")
        check(dict(info.metadata) == {"userId": alice, "stripeCustomerId": state["customer"]},
              f"metadata {dict(info.metadata)}")
        check(ours not in stripe.customers, "our duplicate Stripe customer was not deleted")
        return "link-race", {**fields, "adopted": customer}

    @step
    def link_customer_taken():
        info, _, _ = expect_error(
            lambda: call(stub.Link, pb.LinkRequest(user_id=bob, stripe_customer_id=state["customer"])),
            "ALREADY_EXISTS")
        fields = info_fields("ALREADY_EXISTS", info, "CUSTOMER_ALREADY_LINKED")
        check(dict(info.metadata) == {"userId": alice, "stripeCustomerId": state["customer"]},
              f"metadata {dict(info.metadata)}")
        return "link-customer-taken", fields

    @step
    def webhook_get():
        # customer.subscription.updated for state["customer"]: whose is it?
        response, _ = call(stub.Get, pb.GetRequest(stripe_customer_id=state["customer"]))
        check(response.mapping.user_id == alice, f"user {response.mapping.user_id}")
        return "webhook-get", {"customer": state["customer"], "user": response.mapping.user_id}

    @step
    def webhook_unknown():
        unknown = stripe.create_customer()  # made outside this billing service
        info, _, _ = expect_error(
            lambda: call(stub.Get, pb.GetRequest(stripe_customer_id=unknown)), "NOT_FOUND")
        fields = info_fields("NOT_FOUND", info, "MAPPING_NOT_FOUND")
        check(dict(info.metadata) == {"stripeCustomerId": unknown}, f"metadata {dict(info.metadata)}")
        return "webhook-unknown", fields

    @step
    def invalid():
        _, bad_request, _ = expect_error(
            lambda: call(stub.Link, pb.LinkRequest(user_id="user 42", stripe_customer_id="cus_")),
            "INVALID_ARGUMENT")
        check(bad_request is not None, "no google.rpc.BadRequest detail")
        fields = sorted(v.field for v in bad_request.field_violations)
        check(all(v.description for v in bad_request.field_violations), "a violation has no description")
        return "invalid", {"code": "INVALID_ARGUMENT", "fields": ",".join(fields)}

    @step
    def invalid_no_key():
        _, bad_request, _ = expect_error(lambda: call(stub.Get, pb.GetRequest()), "INVALID_ARGUMENT")
        check(bad_request is not None, "no google.rpc.BadRequest detail")
        fields = sorted(v.field for v in bad_request.field_violations)
        return "invalid-no-key", {"code": "INVALID_ARGUMENT", "fields": ",".join(fields)}

    @step
    def request_id():
        sent_ok, sent_err = f"billing-{run}-ok", f"billing-{run}-err"
        _, echoed_ok = call(stub.Get, pb.GetRequest(user_id=alice), request_id=sent_ok)
        _, _, err = expect_error(
            lambda: call(stub.Get, pb.GetRequest(user_id=bob), request_id=sent_err), "NOT_FOUND")
        echoed_err = metadata_value(err.trailing_metadata(), "x-request-id")
        check(echoed_ok == sent_ok, f"success echoed {echoed_ok!r}")
        check(echoed_err == sent_err, f"error echoed {echoed_err!r}")
        return "request-id", {"ok": echoed_ok, "error": echoed_err}

    @step
    def unlink():
        # Account deletion: remove the mapping (and then, in real life, the customer).
        response, _ = call(stub.Unlink, pb.UnlinkRequest(user_id=alice))
        check(response.mapping.stripe_customer_id == state["customer"], "unlinked another customer")
        return "unlink", {"user": alice, "customer": response.mapping.stripe_customer_id}

    @step
    def unlink_retry():
        # A retried Unlink whose first attempt succeeded: NOT_FOUND means done.
        info, _, _ = expect_error(lambda: call(stub.Unlink, pb.UnlinkRequest(user_id=alice)), "NOT_FOUND")
        fields = info_fields("NOT_FOUND", info, "MAPPING_NOT_FOUND")
        check(dict(info.metadata) == {"userId": alice}, f"metadata {dict(info.metadata)}")
        return "unlink-retry", fields

    printed = 0
    with channel:
        for fn in steps:
            try:
                lines = fn()
            except (StepFailed, grpc.RpcError, KeyError, ValueError) as exc:
                why = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
                print(f"STEP {fn.__name__.replace('_', '-')} FAIL {why}", flush=True)
                return 1
            for name, fields in lines if isinstance(lines, list) else [lines]:
                shown = " ".join(f"{k}={v}" for k, v in fields.items())
                print(f"STEP {name} OK {shown}", flush=True)
                printed += 1
    print(f"DONE {printed} steps OK", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A billing service's use of customermapping.v1.")
    parser.add_argument("address", metavar="HOST:PORT")
    connect.add_arguments(parser)
    args = parser.parse_args()
    sys.exit(main(connect.open_channel(args.address, args)))
