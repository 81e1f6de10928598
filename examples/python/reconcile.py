"""A reconciliation job over customermapping.v1: List every mapping and
compare it with Stripe's own customer list.

Usage: python reconcile.py HOST:PORT

A nightly job in the billing team walks every mapping with List (keyset
pages, following next_page_token until it is empty) and compares with the
customers Stripe has:
  - a mapping whose customer Stripe no longer has (deleted in the dashboard),
  - a Stripe customer no mapping holds (an orphan: the race the service
    exists to end, or a Link that never happened), to delete or link.
BatchGet then fetches the mappings of a webhook batch in one call.

To be self-contained it first links a few mappings and fakes Stripe's list.
Prints `RECONCILE <what> key=value ...` lines, then `DONE reconcile OK`;
on any surprise `RECONCILE FAIL <why>` and exit 1.
"""

import sys
import uuid

import grpc

import generate

sys.path.insert(0, generate.generate())
from customermapping.v1 import customer_mapping_pb2 as pb  # noqa: E402
from customermapping.v1 import customer_mapping_pb2_grpc as pb_grpc  # noqa: E402

DEADLINE_SECONDS = 5.0
PAGE_SIZE = 2  # small to show the paging; a real job uses up to 1000


def all_mappings(stub):
    """Every mapping, oldest first, and how many pages it took: a mapping
    present for the whole walk comes exactly once, even while other callers
    Link and Unlink."""
    mappings, token, pages = [], "", 0
    while True:
        page = stub.List(pb.ListRequest(page_size=PAGE_SIZE, page_token=token), timeout=DEADLINE_SECONDS)
        pages += 1
        mappings.extend(page.mappings)
        if not page.next_page_token:
            return mappings, pages
        # On UNAVAILABLE a job retries the same token: tokens do not expire.
        token = page.next_page_token


def main(address):
    stub = pb_grpc.CustomerMappingStub(grpc.insecure_channel(address))
    run = uuid.uuid4().hex[:8]
    linked = {}
    for i in range(5):
        user, customer = f"user-{run}-{i}", f"cus_{run}R{i}"
        stub.Link(pb.LinkRequest(user_id=user, stripe_customer_id=customer), timeout=DEADLINE_SECONDS)
        linked[customer] = user
    # Stripe lost customer 0 and has one customer nobody linked.
    stripe_customers = set(linked) - {f"cus_{run}R0"} | {f"cus_{run}Orphan"}

    mappings, pages = all_mappings(stub)
    ours = {m.stripe_customer_id: m.user_id for m in mappings if run in m.stripe_customer_id}
    if ours != linked:
        raise AssertionError(f"List returned {ours}, expected {linked}")
    print(f"RECONCILE listed mappings={len(ours)} pages={pages}")
    for customer in sorted(set(ours) - stripe_customers):
        print(f"RECONCILE missing-in-stripe customer={customer} user={ours[customer]}")
    for customer in sorted(c for c in stripe_customers - set(ours) if run in c):
        print(f"RECONCILE orphan customer={customer}")

    keys = [pb.MappingKey(stripe_customer_id=c) for c in (f"cus_{run}R1", f"cus_{run}Orphan")]
    results = stub.BatchGet(pb.BatchGetRequest(keys=keys), timeout=DEADLINE_SECONDS).results
    found = [r.mapping.user_id if r.HasField("mapping") else "-" for r in results]
    print(f"RECONCILE batch-get users={','.join(found)}")
    print("DONE reconcile OK")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        main(sys.argv[1])
    except (grpc.RpcError, AssertionError) as err:
        print(f"RECONCILE FAIL {err}")
        sys.exit(1)
