"""The eviction queue shared by G2 (`control.pool`) and G3 (`disk.index`): exact orders."""

from kvbm_shm.eviction import NUM_CLASSES, EvictionQueue, priority_class


def drain(q: EvictionQueue) -> list[int]:
    out = []
    while (b := q.pop()) >= 0:
        out.append(b)
    return out


def test_priority_classes_are_bounded_and_ordered():
    prios = [-2**15, -257, -256, -17, -16, -2, -1, 0, 1, 15, 16, 255, 256, 2**15 - 1]
    classes = [priority_class(x) for x in prios]
    assert classes == [0, 0, 1, 1, 2, 2, 3, 4, 5, 5, 6, 6, 7, 7]
    assert set(classes) == set(range(NUM_CLASSES))


def test_lowest_class_first_then_least_recently_used():
    q = EvictionQueue(6)
    for slot, prio in ((0, 5), (1, 0), (2, 0), (3, -1), (4, 0), (5, 300)):
        q.push(slot, prio)
    q.touch([1])  # 1 is now more recent than 2 and 4
    assert len(q) == 6 and q.order(3) == [3, 2, 4]
    assert drain(q) == [3, 2, 4, 1, 0, 5]
    assert q.pop() == -1 and len(q) == 0


def test_remove_front_and_contains():
    q = EvictionQueue(4)
    for slot in range(4):
        q.push(slot, 0)
    assert q.remove(2) and not q.remove(2) and 2 not in q and 1 in q
    q.to_front(3)
    q.push(2, 0, front=True)
    assert q.order(10) == [2, 3, 0, 1]
    q.to_front(2)  # already first: stays
    assert drain(q) == [2, 3, 0, 1]


def test_touch_moves_runs_and_single_slots_in_the_order_given():
    q = EvictionQueue(8)
    for slot in range(8):
        q.push(slot, 0)
    q.touch([1, 2, 3])  # one run
    assert q.order(8) == [0, 4, 5, 6, 7, 1, 2, 3]
    q.touch([5, 6, 0, 1, 7])  # runs 5-6, then 0, then 1, then 7 (7 does not follow 1 any more)
    assert q.order(8) == [4, 2, 3, 5, 6, 0, 1, 7]
    q.remove(3)
    q.touch([3, 2, 3, 4])  # unqueued and repeated slots: 3 is skipped, each move happens in turn
    assert q.order(8) == [5, 6, 0, 1, 7, 2, 4]
    q.touch([])
    assert len(q) == 7


def test_touch_keeps_classes_apart():
    q = EvictionQueue(4)
    q.push(0, 0)
    q.push(1, 0)
    q.push(2, 20)
    q.push(3, 20)
    q.touch([2, 3, 0])  # 3 and 0 are in different classes: never one run
    assert drain(q) == [1, 0, 2, 3]
