"""The native buffer a sequence's KV state is read into and loaded from."""

from __future__ import annotations

import ctypes


class StateBuffer:
    """A preallocated native buffer for llama_state_seq_get/set_data, grown (never shrunk)
    when a state does not fit: a restore or capture allocates nothing in the common case."""

    def __init__(self, size: int = 0) -> None:
        self.array = (ctypes.c_uint8 * max(size, 1))()

    def ensure(self, size: int) -> None:
        if len(self.array) < size:
            self.array = (ctypes.c_uint8 * int(size * 1.25))()

    def view(self, size: int) -> memoryview:
        return memoryview(self.array).cast("B")[:size]
