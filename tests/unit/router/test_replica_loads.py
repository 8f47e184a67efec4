from router.replica_loads import ReplicaLoads


def test_before_a_report_only_this_routers_open_requests_count():
    loads = ReplicaLoads()
    loads.sent("a")
    loads.sent("a")
    loads.sent("b")
    loads.ended("a")
    assert [loads.load(r) for r in "abc"] == [1, 1, 0]


def test_a_report_counts_every_router_plus_what_was_sent_since():
    loads = ReplicaLoads()
    loads.sent("a")
    loads.reported("a", 10)  # this router's 1 and 9 from others
    assert loads.load("a") == 10
    loads.sent("a")
    loads.sent("a")
    assert loads.load("a") == 12
    loads.ended("a")  # ended here, but the replica's next report says so
    assert loads.load("a") == 12
    loads.reported("a", 4)
    assert loads.load("a") == 4


def test_never_less_than_this_routers_own_requests():
    loads = ReplicaLoads()
    for _ in range(3):
        loads.sent("a")
    loads.reported("a", 0)  # a report from before those arrived there
    assert loads.load("a") == 3


def test_forgetting_a_replica_keeps_its_open_requests_until_they_end():
    loads = ReplicaLoads()
    loads.sent("a")
    loads.reported("a", 7)
    loads.reported("b", 2)
    loads.forget("b")
    assert [loads.load(r) for r in "ab"] == [7, 0]
    loads.forget("a")
    assert loads.load("a") == 1
    loads.ended("a")
    assert loads.load("a") == 0
