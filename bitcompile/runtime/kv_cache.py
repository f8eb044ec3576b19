"""The paged KV cache of a loaded artifact: its sequences, and the pages promised to them."""

from __future__ import annotations

from collections.abc import Sequence

PAGE_SIZE = 16  # tokens per page


def pages_for(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE)


class CacheBusyError(RuntimeError):
    """The KV cache has no room for another sequence now (every slot or page is taken)."""


class KVCache:
    """TVM's paged KV cache with its sequences, and the pages promised to them.

    A sequence reserves, when it starts, the pages it can grow into (prompt + most tokens it may
    generate); the sum of reservations never exceeds the cache, so a running sequence never finds it
    full (TVM would raise mid-step) and nothing is ever evicted to make room."""

    def __init__(self, tvm, handle, max_batch: int):
        self._tvm, self.handle, self.max_batch = tvm, handle, max_batch
        self._f = {name: tvm.get_global_func(f"vm.builtin.kv_state_{name}")
                   for name in ("add_sequence", "remove_sequence", "fork_sequence", "begin_forward", "end_forward")}
        self._available = tvm.get_global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
        self.total_pages = int(self._available(handle))
        self.reserved: dict[int, int] = {}  # sequence id -> pages promised

    def free_pages(self) -> int:
        return self.total_pages - sum(self.reserved.values())

    def can_add(self, pages: int) -> bool:
        return len(self.reserved) < self.max_batch and pages <= self.free_pages()

    def add(self, seq: int, pages: int):
        if not self.can_add(pages):
            raise CacheBusyError(
                f"the KV cache has no room for another sequence: {len(self.reserved)} of max_batch={self.max_batch} "
                f"sequences, {self.free_pages()} of {self.total_pages} pages free ({pages} needed); wait for requests "
                "to finish, or load with a larger max_batch")
        self._f["add_sequence"](self.handle, seq)
        self.reserved[seq] = pages

    def remove(self, seq: int):
        if self.reserved.pop(seq, None) is not None:
            self._f["remove_sequence"](self.handle, seq)

    def used_pages(self) -> int:
        return self.total_pages - int(self._available(self.handle))

    def begin(self, seqs: Sequence[int], lengths: Sequence[int]):
        shape = self._tvm.runtime.ShapeTuple
        self._f["begin_forward"](self.handle, shape(list(seqs)), shape(list(lengths)))

    def end(self):
        self._f["end_forward"](self.handle)
