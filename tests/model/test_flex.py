"""The optional FlexAttention path of the memory layers gives the dense-mask SDPA results.

Run eagerly here (flex materialises the scores without torch.compile): this checks the mask
rule, not the speed."""

import pytest
import torch

from model import KVCache, flex

from .helpers import make_model, random_memories, random_tokens

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    monkeypatch.setattr(flex, "COMPILE", False)


@pytest.mark.parametrize("n_heads,n_kv_heads,T", [(4, 2, 37), (4, 4, 16), (4, 1, 150)])
def test_flex_memory_layers_equal_sdpa(n_heads, n_kv_heads, T):
    model = make_model(n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=2, n_mem_layers=1)
    cfg = model.config
    gen = torch.Generator().manual_seed(30)
    tokens = random_tokens(gen, cfg, 2, T)
    memories, mask = random_memories(gen, cfg, 2, -(-T // cfg.mem_chunk_size), 3, 4)
    with torch.no_grad():
        dense = model(tokens, memories, mask)
        model.use_flex = True
        flexed = model(tokens, memories, mask)
    torch.testing.assert_close(flexed, dense, atol=1e-5, rtol=1e-5)


def test_flex_prefill_after_cached_tokens_equals_sdpa():
    model = make_model()
    cfg = model.config
    gen = torch.Generator().manual_seed(31)
    tokens = random_tokens(gen, cfg, 1, 40)
    memories, mask = random_memories(gen, cfg, 1, 3, 2, 3)
    outs = []
    for use_flex in (False, True):
        model.use_flex = use_flex
        cache = KVCache(model, 1, 40, with_memory=True)
        with torch.no_grad():
            first = model(tokens[:, :20], memories[:, :2], mask[:, :2], cache=cache)
            rest = model(tokens[:, 20:], memories[:, 1:], mask[:, 1:], cache=cache)
        outs.append(torch.cat([first, rest], 1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
