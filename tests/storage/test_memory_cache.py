"""The MemoryStore's RAM cache under any sequence of requests: every answer equals the Lance
path's (no cache), and the cache holds exactly what a plain LRU of the documented rule holds
(per request: its hits refreshed in the order asked, then its misses inserted in that order,
the least recently used evicted; a request larger than the cache keeps its last misses).
fetch answers through three paths (all distinct misses; every id fits in the cache; a request
larger than the cache): random requests with repeats, hits and misses reach all three."""

from __future__ import annotations

from collections import OrderedDict

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from model.codecs import make_codec
from storage.bank import Bank
from storage.memory_store import MemoryStore
from tests.storage.test_slab import MODEL, rows, write

N = 24


def reference_lru(cache: OrderedDict, request: list[str], capacity: int) -> None:
    uniq = list(dict.fromkeys(request))
    for r in uniq:
        if r in cache:
            cache.move_to_end(r)
    misses = [r for r in uniq if r not in cache]
    for r in misses[max(0, len(misses) - capacity) :]:
        if len(cache) >= capacity:
            cache.popitem(last=False)
        cache[r] = None


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    bank, codec = Bank(str(tmp_path_factory.mktemp("bank"))), make_codec("raw-bf16")
    write(bank, rows(codec, N), codec, (None, None))
    return bank


@pytest.fixture(scope="module")
def lance(bank):
    return MemoryStore(bank, MODEL, cache_size=0, slab="off")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    capacity=st.integers(0, 8),
    slab=st.sampled_from(["auto", "off"]),
    requests=st.lists(st.lists(st.integers(0, N - 1), min_size=0, max_size=12), min_size=1, max_size=8),
)
def test_answers_equal_lance_and_the_cache_is_an_lru(bank, lance, capacity, slab, requests):
    store = MemoryStore(bank, MODEL, cache_size=capacity, slab=slab)
    ids = list(store.row_of)
    want_cache: OrderedDict = OrderedDict()
    for req in requests:
        ask = [ids[i] for i in req]
        before = store.hits
        mems, mask = store.fetch(ask)
        want = lance.fetch(ask)
        assert mems.dtype == torch.bfloat16 and torch.equal(mems, want[0]) and torch.equal(mask, want[1])
        assert store.hits - before == len(ask) - len([r for r in dict.fromkeys(ask) if r not in want_cache])
        reference_lru(want_cache, ask, capacity)
        assert list(store.cache) == list(want_cache)
        if len(ask):
            mems.view(torch.int16).fill_(7)  # an answer is the caller's own: the cache keeps its copy
    for r in list(store.cache):  # what it kept is intact
        assert torch.equal(store.fetch([r])[0], lance.fetch([r])[0])
