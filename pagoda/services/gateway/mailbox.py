"""A request's outputs on their way from the reply consumer to the one task that streams them.

`asyncio.Queue` does more per item than this needs (unfinished-task accounting, an Event, a
deque of getters and one of putters), and at one token per stream per step that work is paid
for every token. `Mailbox` keeps what the gateway uses: `put_nowait` (never blocks), `get` for
one reader at a time, `empty`. An item put while a `get` is being cancelled stays for the next.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    """An unbounded FIFO with one reader."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the reader's, while it waits

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> T:
        items = self._items
        while not items:
            assert self._waiter is None, "a Mailbox has one reader"
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return items.popleft()
