"""router.owed_aborts: a request no longer read is aborted once, again only if that failed."""

from __future__ import annotations

from router.owed_aborts import OwedAborts


def test_a_request_never_aborted_is_owed_one():
    assert OwedAborts().owed("a", now=0.0)


def test_a_late_delta_after_an_abort_on_its_way_is_not_owed_another():
    aborts = OwedAborts(memory_s=30.0)
    aborts.sent("a", now=10.0)
    assert not aborts.owed("a", now=10.001)  # the step in flight when the Abort left
    assert not aborts.owed("a", now=39.9)
    assert aborts.owed("b", now=10.001)  # another request is not covered by it


def test_an_abort_that_did_not_arrive_is_owed_again():
    aborts = OwedAborts()
    aborts.sent("a", now=1.0)
    aborts.failed("a")  # the replica was cut off
    assert aborts.owed("a", now=1.5)  # its deltas come again on a new stream
    aborts.sent("a", now=1.5)
    assert not aborts.owed("a", now=1.6)


def test_deltas_long_after_an_abort_are_owed_one_again():
    aborts = OwedAborts(memory_s=30.0)
    aborts.sent("a", now=0.0)
    assert aborts.owed("a", now=30.0)


def test_old_aborts_are_forgotten_as_new_ones_are_sent():
    aborts = OwedAborts(memory_s=30.0)
    for i in range(1000):
        aborts.sent(f"r{i}", now=i * 0.1)  # 100 s of aborts, 10 a second
    assert len(aborts) == 300  # the last 30 s of them
    assert not aborts.owed("r999", now=99.95) and aborts.owed("r0", now=99.95)


def test_an_abort_sent_again_moves_to_the_newest():
    aborts = OwedAborts(memory_s=30.0)
    aborts.sent("a", now=0.0)
    aborts.sent("b", now=10.0)
    aborts.sent("a", now=20.0)  # again: remembered from 20 s now
    aborts.sent("c", now=45.0)  # "b" is forgotten (35 s old); "a" (25 s) is not
    assert aborts.owed("b", now=45.0) and not aborts.owed("a", now=45.0)
    assert len(aborts) == 2
