"""The batching scheduler's policy: who waits, who is let in next, and each one's place
in line. Pure bookkeeping, no model and no threads (nano-vllm and vLLM v1 cut their
schedulers the same way), so fairness is tested with plain objects.

Requests wait in one queue per channel; channels take turns (round-robin), so one busy
channel cannot starve the others. A request is a group: one sequence, or a best-of-n
request's candidates, which join the batch whole or not at all. The next group in turn
that does not fit keeps its turn and the others wait behind it: nothing slips past a
large request for ever.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

G = TypeVar("G")


@dataclass(frozen=True)
class Room:
    """What the batch holds: its bounds, and what is in it already."""

    max_rows: int
    max_tokens: int
    """Bound on prompt + new tokens over all rows (the KV cache's positions)."""
    max_prefill: int
    """Most prompt tokens let in between two decoding steps (the first group in turn
    is let in whatever its prompt, when the batch has room for it)."""
    rows: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Shape:
    """A group's size: its rows, and each row's prompt and most new tokens."""

    rows: int
    prompt: int
    new: int

    @property
    def tokens(self) -> int:
        return self.rows * (self.prompt + self.new)


class FairQueue(Generic[G]):
    """Groups waiting per channel, let in round-robin across channels."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[G]] = OrderedDict()

    def push(self, channel: str, group: G) -> None:
        self._queues.setdefault(channel, deque()).append(group)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return any(self._queues.values())

    def __iter__(self) -> Iterator[G]:
        return (group for queue in self._queues.values() for group in queue)

    def clear(self) -> list[G]:
        """Empty the queues; returns what waited."""
        waited = list(self)
        self._queues.clear()
        return waited

    def remove(self, gone: Callable[[G], bool]) -> list[G]:
        """Take out the groups `gone` says have left (a cancelled request); returns them."""
        removed = []
        for channel in list(self._queues):
            queue = self._queues[channel]
            for group in [g for g in queue if gone(g)]:
                queue.remove(group)
                removed.append(group)
            if not queue:
                del self._queues[channel]
        return removed

    def admit(
        self, room: Room, shape: Callable[[G], Shape], accept: Callable[[G], bool]
    ) -> list[G]:
        """Let groups in, in turn, while the batch has room. `accept(group)` prepares
        one (False: it failed and left, taking no room). A channel whose group is let in
        goes to the back of the line."""
        rows, tokens, prefill = room.rows, room.tokens, 0
        admitted: list[G] = []
        while self._queues:
            channel, queue = next(iter(self._queues.items()))
            group = queue[0]
            size = shape(group)
            if rows + size.rows > room.max_rows:
                break
            if admitted and (
                tokens + size.tokens > room.max_tokens or prefill + size.prompt > room.max_prefill
            ):
                break
            if not admitted and room.rows and tokens + size.tokens > room.max_tokens:
                break
            queue.popleft()
            del self._queues[channel]  # to the back of the line
            if queue:
                self._queues[channel] = queue
            if not accept(group):
                continue
            admitted.append(group)
            rows += size.rows
            tokens += size.tokens
            prefill += size.prompt
        return admitted

    def positions(self) -> Iterator[tuple[G, int]]:
        """Each waiting group with its place in line (0: next), in the order the
        round-robin will reach them."""
        queues = [list(q) for q in self._queues.values()]
        position = 0
        for depth in range(max((len(q) for q in queues), default=0)):
            for queue in queues:
                if depth < len(queue):
                    yield queue[depth], position
                    position += 1
