from router.unresponsive import UnresponsiveReplicas


def test_a_failed_replica_is_unresponsive_for_the_cooloff_then_tried_again():
    r = UnresponsiveReplicas(cooloff_s=30)
    assert not r.is_unresponsive("a", 0.0)
    r.failed("a", 100.0)
    assert r.is_unresponsive("a", 100.0) and r.is_unresponsive("a", 129.9)
    assert not r.is_unresponsive("b", 100.0)
    assert not r.is_unresponsive("a", 130.0)
    assert not r.is_unresponsive("a", 100.0)  # forgotten once its cool-off ended


def test_each_failure_starts_a_new_cooloff():
    r = UnresponsiveReplicas(cooloff_s=30)
    r.failed("a", 100.0)
    r.failed("a", 120.0)
    assert r.is_unresponsive("a", 149.0)
    assert not r.is_unresponsive("a", 150.0)


def test_hearing_from_a_replica_ends_its_cooloff():
    r = UnresponsiveReplicas(cooloff_s=30)
    r.failed("a", 100.0)
    r.failed("b", 100.0)
    r.heard_from("a")
    r.heard_from("c")  # never failed: nothing to end
    assert not r.is_unresponsive("a", 101.0)
    assert r.is_unresponsive("b", 101.0)
