"""The scheduler's policy on its own: plain objects, no model, no threads, no sleeps."""

from dataclasses import dataclass

from storyengine.serving.policy import FairQueue, Room, Shape


@dataclass(eq=False)
class Req:
    channel: str
    name: str
    rows: int = 1
    prompt: int = 10
    new: int = 10


def shape(req: Req) -> Shape:
    return Shape(req.rows, req.prompt, req.new)


def queue_of(*reqs: Req) -> FairQueue[Req]:
    queue: FairQueue[Req] = FairQueue()
    for req in reqs:
        queue.push(req.channel, req)
    return queue


def admit(queue: FairQueue[Req], room: Room, refuse: set[str] = frozenset()) -> list[str]:
    return [r.name for r in queue.admit(room, shape, lambda r: r.name not in refuse)]


ROOMY = Room(max_rows=100, max_tokens=100_000, max_prefill=100_000)


def test_channels_take_turns_so_a_busy_one_cannot_starve_the_others():
    queue = queue_of(*(Req("busy", f"b{i}") for i in range(5)), Req("quiet", "q0"))
    assert admit(queue, Room(max_rows=2, max_tokens=100_000, max_prefill=100_000)) == [
        "b0",
        "q0",
    ]
    assert admit(queue, ROOMY) == ["b1", "b2", "b3", "b4"]
    assert not queue


def test_a_channel_that_was_served_goes_to_the_back_of_the_line():
    queue = queue_of(Req("a", "a0"), Req("a", "a1"), Req("b", "b0"), Req("c", "c0"))
    one = Room(max_rows=1, max_tokens=100_000, max_prefill=100_000)
    assert [admit(queue, one) for _ in range(4)] == [["a0"], ["b0"], ["c0"], ["a1"]]


def test_a_group_joins_whole_or_keeps_its_turn_and_nothing_slips_past_it():
    queue = queue_of(Req("a", "group", rows=4), Req("b", "small"))
    assert admit(queue, Room(max_rows=8, max_tokens=100_000, max_prefill=100_000, rows=5)) == []
    assert [r.name for r in queue] == ["group", "small"]  # the small one did not jump it
    assert admit(queue, Room(max_rows=8, max_tokens=100_000, max_prefill=100_000, rows=4)) == [
        "group"
    ]


def test_the_token_bound_and_the_prefill_budget_stop_admission():
    queue = queue_of(Req("a", "a0", prompt=300), Req("b", "b0", prompt=300), Req("c", "c0"))
    # The first in turn is let in whatever its prompt; the next would pass the budget.
    assert admit(queue, Room(max_rows=10, max_tokens=100_000, max_prefill=400)) == ["a0"]
    # A running batch with no token room left lets nothing in.
    full = Room(max_rows=10, max_tokens=1000, max_prefill=10_000, rows=3, tokens=900)
    assert admit(queue, full) == []
    # An empty batch lets the first in even when it alone is over the token bound.
    assert admit(queue, Room(max_rows=10, max_tokens=100, max_prefill=10_000)) == ["b0"]


def test_a_group_that_cannot_be_prepared_leaves_and_takes_no_room():
    queue = queue_of(Req("a", "broken"), Req("b", "fine"))
    assert admit(queue, Room(max_rows=1, max_tokens=100_000, max_prefill=100_000), {"broken"})
    assert not queue


def test_cancelled_groups_leave_and_empty_channels_are_forgotten():
    a0, a1, b0 = Req("a", "a0"), Req("a", "a1"), Req("b", "b0")
    queue = queue_of(a0, a1, b0)
    assert queue.remove(lambda r: r.channel == "a") == [a0, a1]
    assert list(queue) == [b0] and len(queue) == 1
    queue.push("a", a0)  # a channel that comes back queues behind b
    assert admit(queue, ROOMY) == ["b0", "a0"]


def test_places_in_line_follow_the_round_robin():
    queue = queue_of(Req("a", "a0"), Req("a", "a1"), Req("a", "a2"), Req("b", "b0"))
    places = {req.name: place for req, place in queue.positions()}
    assert places == {"a0": 0, "b0": 1, "a1": 2, "a2": 3}
    assert admit(queue, ROOMY) == sorted(places, key=places.get)


def test_the_policy_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, storyengine.serving.policy; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
