"""The paged KV cache of a loaded artifact: its sequences, the pages promised to them, and the
finished sequences kept as reusable prefixes."""

from __future__ import annotations

import collections
from collections.abc import Sequence

PAGE_SIZE = 16  # tokens per page


def pages_for(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class CacheBusyError(RuntimeError):
    """The KV cache has no room for another sequence now (every slot or page is taken)."""


class KVCache:
    """TVM's paged KV cache with its sequences, and the pages promised to them.

    A live sequence reserves, when it starts, every page it can grow into (prompt + the most tokens it
    may generate, shared prefix pages counted again); reservations plus the pages of kept prefixes
    never exceed the cache, so a running sequence never finds it full (TVM would raise mid-step) and
    is never evicted. A finished sequence stays as a prefix that later prompts can fork from
    (`fork_sequence`: its pages are shared, not prefilled again) until its pages are needed: the
    least recently used prefix goes first."""

    def __init__(self, tvm, handle, max_batch: int):
        self._tvm, self.handle, self.max_batch = tvm, handle, max_batch
        self._f = {name: tvm.get_global_func(f"vm.builtin.kv_state_{name}")
                   for name in ("add_sequence", "remove_sequence", "fork_sequence", "begin_forward", "end_forward")}
        self._available = tvm.get_global_func("vm.builtin.attention_kv_cache_get_num_available_pages")
        self.total_pages = int(self._available(handle))
        self.reserved: dict[int, int] = {}  # live sequence id -> pages promised
        self.kept: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # prefix id -> its tokens

    def free_pages(self) -> int:
        return self.total_pages - sum(self.reserved.values()) - sum(pages_for(len(t)) for t in self.kept.values())

    def kept_pages(self) -> int:
        return sum(pages_for(len(t)) for t in self.kept.values())

    def can_add(self, pages: int) -> bool:
        """Whether a sequence needing `pages` fits now, counting the kept prefixes it may evict."""
        return len(self.reserved) < self.max_batch and pages <= self.free_pages() + self.kept_pages()

    def add(self, seq: int, pages: int, parent: int | None = None, fork_at: int = 0):
        """Start sequence `seq` with `pages` promised: empty, or the first `fork_at` tokens of `parent`
        (a live sequence or a kept prefix) shared."""
        if not self.can_add(pages):
            raise CacheBusyError(
                f"the KV cache has no room for another sequence: {len(self.reserved)} of max_batch={self.max_batch} "
                f"sequences, {self.free_pages()} of {self.total_pages} pages free ({pages} needed); wait for requests "
                "to finish, or load with a larger max_batch")
        self._make_room(pages, keep=parent)
        if pages > self.free_pages():  # only dropping the parent makes room: start empty instead
            parent = None
            self._make_room(pages, keep=None)
        if parent is None:
            self._f["add_sequence"](self.handle, seq)
        else:
            self._f["fork_sequence"](self.handle, parent, seq, fork_at)
            if parent in self.kept:
                self.kept.move_to_end(parent)
        self.reserved[seq] = pages
        return parent

    def _make_room(self, pages: int, keep: int | None):
        for seq in [s for s in self.kept if s != keep]:
            if self.free_pages() >= pages:
                return
            self.drop(seq)

    def retire(self, seq: int, tokens: Sequence[int]):
        """A live sequence has ended: keep its first `tokens` (those in its KV) as a prefix to reuse."""
        if self.reserved.pop(seq, None) is None:
            return
        if tokens:
            self.kept[seq] = list(tokens)
        else:
            self._f["remove_sequence"](self.handle, seq)

    def remove(self, seq: int):
        """End a live sequence and free its pages (nothing kept)."""
        if self.reserved.pop(seq, None) is not None:
            self._f["remove_sequence"](self.handle, seq)

    def drop(self, seq: int):
        """Forget a kept prefix; its pages are freed (those not shared with a live sequence)."""
        if self.kept.pop(seq, None) is not None:
            self._f["remove_sequence"](self.handle, seq)

    def drop_all_kept(self):
        for seq in list(self.kept):
            self.drop(seq)

    def longest_prefix(self, ids: Sequence[int], live: dict[int, Sequence[int]]) -> tuple[int | None, int]:
        """(sequence, length) of the longest start of `ids` held in the cache, by a live sequence
        (`live`: id -> tokens in its KV) or a kept prefix; (None, 0) when none."""
        best, length = None, 0
        for seq, tokens in [*live.items(), *self.kept.items()]:
            n = common_prefix(tokens, ids)
            if n > length:
                best, length = seq, n
        return best, length

    def used_pages(self) -> int:
        return self.total_pages - int(self._available(self.handle))

    def begin(self, seqs: Sequence[int], lengths: Sequence[int]):
        shape = self._tvm.runtime.ShapeTuple
        self._f["begin_forward"](self.handle, shape(list(seqs)), shape(list(lengths)))

    def end(self):
        self._f["end_forward"](self.handle)
