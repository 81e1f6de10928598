"""A local cache of every mapping, kept exact with List + Watch.

Usage: python cache.py ADDR_A ADDR_B [--churn N]

`MappingCache` is the reusable part (README "Watching changes"): open Watch
with an empty `after` (the first response is a bookmark: cursor c), List
every page into memory, then apply the stream's events after c in order,
remembering each response's cursor. After a stream error it resumes with
`after` = the last cursor (exponential backoff, capped and jittered), on
whichever address it is pointed at; on INVALID_ARGUMENT (a cursor this
deployment did not hand out) it lists again from scratch. No response for
twice the bookmark interval (plus slack) counts as a dead stream: it cancels
the call and resumes. Look-ups by user id or by customer id answer from
memory.

The program starts the cache on ADDR_A, makes N (default 200) random Links
and Unlinks through both addresses over a few users and customers (so keys
are reused), moves the cache's stream to ADDR_B midway (it cancels the call:
the cache resumes from its last cursor there), links a unique marker pair
last and waits (30 s at most) until the cache has applied it, then compares
the cache with a fresh List. Prints
`CACHE listed=<n> cached=<n> events=<n> resumes=<n>` and `DONE cache OK`,
or `CACHE FAIL <why>` and exits 1.
"""

import argparse
import random
import sys
import threading
import time
import uuid

import grpc

import generate

sys.path.insert(0, generate.generate())
from customermapping.v1 import customer_mapping_pb2 as pb  # noqa: E402
from customermapping.v1 import customer_mapping_pb2_grpc as pb_grpc  # noqa: E402

DEADLINE_SECONDS = 5.0
PAGE_SIZE = 1000


def mapping_key(m):
    """A mapping as a comparable value: both ids and when it was linked (a
    re-link of the same pair is a new mapping)."""
    return (m.user_id, m.stripe_customer_id, m.create_time.seconds, m.create_time.nanos)


def list_all(stub):
    """Every mapping, following next_page_token until it is empty."""
    mappings, token = [], ""
    while True:
        page = stub.List(pb.ListRequest(page_size=PAGE_SIZE, page_token=token), timeout=DEADLINE_SECONDS)
        mappings.extend(mapping_key(m) for m in page.mappings)
        if not page.next_page_token:
            return mappings
        token = page.next_page_token


class MappingCache:
    """Every mapping, in memory, kept up to date by one Watch stream."""

    def __init__(self, channel, bookmark_interval=10.0, backoff_base=0.1, backoff_max=5.0):
        self._cond = threading.Condition()
        self._stub = pb_grpc.CustomerMappingStub(channel)
        self._dead_after = 2 * bookmark_interval + 5.0  # 10 s bookmarks: 25 s
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._by_user = {}
        self._by_customer = {}
        self._call = None
        self._last_activity = time.monotonic()
        self._stopped = False
        self.cursor = ""
        self.events = 0  # events applied
        self.resumes = 0  # Watch calls with after = the last cursor
        self.relists = 0  # full relists after the first (attempts)

    # --- look-ups, from memory ---
    def customer_of(self, user_id):
        with self._cond:
            m = self._by_user.get(user_id)
            return m[1] if m else None

    def user_of(self, stripe_customer_id):
        with self._cond:
            m = self._by_customer.get(stripe_customer_id)
            return m[0] if m else None

    def snapshot(self):
        with self._cond:
            return set(self._by_user.values())

    def wait_until(self, predicate, timeout):
        """Waits until predicate(cache) holds after some applied response."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    # --- lifecycle ---
    def start(self):
        """Bookmark, full List, then follow the stream in the background.
        Errors of this first sync are raised to the caller."""
        call = self._open(relist=True)
        threading.Thread(target=self._run, args=(call,), daemon=True).start()
        threading.Thread(target=self._watchdog, daemon=True).start()

    def switch(self, channel):
        """Follows the feed through another address (another replica): the
        current stream is cancelled and resumed there from the last cursor."""
        with self._cond:
            self._stub = pb_grpc.CustomerMappingStub(channel)
            call = self._call
        if call is not None:
            call.cancel()

    def stop(self):
        with self._cond:
            self._stopped = True
            call = self._call
        if call is not None:
            call.cancel()

    # --- the stream ---
    def _open(self, relist):
        with self._cond:
            stub, cursor = self._stub, self.cursor
        if relist:
            call = self._track(stub.Watch(pb.WatchRequest()))
            bookmark = next(call)  # no events, the cursor c
            mappings = list_all(stub)
            with self._cond:
                self._by_user = {m[0]: m for m in mappings}
                self._by_customer = {m[1]: m for m in mappings}
                self._apply_locked(bookmark)
        else:
            call = self._track(stub.Watch(pb.WatchRequest(after=cursor)))
            with self._cond:
                self.resumes += 1
        return call

    def _track(self, call):
        with self._cond:
            self._call = call
            self._last_activity = time.monotonic()
            if self._stopped:
                call.cancel()
        return call

    def _run(self, call):
        failures, relist = 0, False
        while True:
            try:
                if call is None:
                    if relist:
                        self.relists += 1  # counted before its look-ups can see it
                    call = self._open(relist)
                    relist = False
                for response in call:
                    failures = 0
                    with self._cond:
                        self._apply_locked(response)
                # The server ended the stream without an error: resume too.
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    relist = True  # the cursor is not this deployment's: start over
            except StopIteration:  # the stream ended before its bookmark
                pass
            call = None
            with self._cond:
                if self._stopped:
                    return
            failures += 1
            delay = min(self._backoff_max, self._backoff_base * 2 ** (failures - 1))
            time.sleep(random.uniform(delay / 2, delay))

    def _apply_locked(self, response):
        for event in response.events:
            m = mapping_key(event.mapping)
            if event.kind == pb.MappingEvent.KIND_LINKED:
                self._remove_locked(self._by_user.get(m[0]))
                self._remove_locked(self._by_customer.get(m[1]))
                self._by_user[m[0]] = m
                self._by_customer[m[1]] = m
            elif event.kind == pb.MappingEvent.KIND_UNLINKED:
                if self._by_user.get(m[0]) == m:  # still the same mapping
                    self._remove_locked(m)
            self.events += 1
        self.cursor = response.cursor
        self._last_activity = time.monotonic()
        self._cond.notify_all()

    def _remove_locked(self, m):
        if m is None:
            return
        if self._by_user.get(m[0]) == m:
            del self._by_user[m[0]]
        if self._by_customer.get(m[1]) == m:
            del self._by_customer[m[1]]

    def _watchdog(self):
        """No response (events or bookmark) for too long: a dead stream."""
        while True:
            time.sleep(1.0)
            with self._cond:
                if self._stopped:
                    return
                call = self._call
                dead = time.monotonic() - self._last_activity > self._dead_after
                if dead:
                    self._last_activity = time.monotonic()
            if dead and call is not None:
                call.cancel()


# --- the demonstration ---------------------------------------------------------
EXPECTED = (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND)
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


def call_with_retry(method, request):
    """One unary call with a deadline; ALREADY_EXISTS and NOT_FOUND are
    outcomes of the churn, transient codes are retried a few times."""
    for attempt in range(4):
        try:
            return method(request, timeout=DEADLINE_SECONDS)
        except grpc.RpcError as err:
            if err.code() in EXPECTED:
                return None
            if err.code() not in RETRIED or attempt == 3:
                raise
            time.sleep(0.2 * 2**attempt)


def main():
    parser = argparse.ArgumentParser(description="List + Watch cache against two replicas")
    parser.add_argument("addr_a")
    parser.add_argument("addr_b")
    parser.add_argument("--churn", type=int, default=200)
    args = parser.parse_args()

    channels = [grpc.insecure_channel(args.addr_a), grpc.insecure_channel(args.addr_b)]
    stubs = [pb_grpc.CustomerMappingStub(c) for c in channels]
    cache = MappingCache(channels[0])
    cache.start()

    run = uuid.uuid4().hex[:8]
    users = [f"user-{run}-{i}" for i in range(5)]
    customers = [f"cus_{run}C{i}" for i in range(5)]
    rng = random.Random()
    for i in range(args.churn):
        if i == args.churn // 2:
            cache.switch(channels[1])
        stub = stubs[i % 2]
        if rng.random() < 0.6:
            request = pb.LinkRequest(user_id=rng.choice(users), stripe_customer_id=rng.choice(customers))
            call_with_retry(stub.Link, request)
        elif rng.random() < 0.5:
            call_with_retry(stub.Unlink, pb.UnlinkRequest(user_id=rng.choice(users)))
        else:
            call_with_retry(stub.Unlink, pb.UnlinkRequest(stripe_customer_id=rng.choice(customers)))

    marker_user, marker_customer = f"user-{run}-marker", f"cus_{run}Marker"
    call_with_retry(stubs[1].Link, pb.LinkRequest(user_id=marker_user, stripe_customer_id=marker_customer))
    if not cache.wait_until(lambda c: c.customer_of(marker_user) == marker_customer, timeout=30):
        raise AssertionError(f"the marker link never reached the cache (cursor {cache.cursor!r})")

    # Other writers (an import, another example) may still be committing: a
    # fresh List and the cache then differ for as long as the feed takes to
    # deliver (WATCH_POLL_INTERVAL); compare again until equal, 30 s at most.
    deadline = time.monotonic() + 30
    while True:
        listed = set(list_all(stubs[0]))
        cached = cache.snapshot()
        if listed == cached or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    cache.stop()
    print(f"CACHE listed={len(listed)} cached={len(cached)} events={cache.events} resumes={cache.resumes}")
    if listed != cached:
        only_list = sorted(listed - cached)[:5]
        only_cache = sorted(cached - listed)[:5]
        raise AssertionError(f"only in List: {only_list} only in cache: {only_cache}")
    print("DONE cache OK")


if __name__ == "__main__":
    try:
        main()
    except (grpc.RpcError, AssertionError) as err:
        print(f"CACHE FAIL {err}")
        sys.exit(1)
