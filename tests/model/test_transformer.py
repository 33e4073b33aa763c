"""The plain transformer (no memories): equal to the loop-based reference, GQA, sizes, errors."""

import pytest
import torch

from model import Memory3, ModelConfig

from .helpers import make_model, random_tokens
from .naive import NaiveModel


@pytest.mark.parametrize("n_heads,n_kv_heads,tie", [(4, 4, True), (4, 2, False), (4, 1, True)])
def test_plain_forward_equals_naive_causal_lm(n_heads, n_kv_heads, tie):
    model = make_model(n_heads=n_heads, n_kv_heads=n_kv_heads, tie_embeddings=tie)
    gen = torch.Generator().manual_seed(1)
    tokens = random_tokens(gen, model.config, 2, 21)
    with torch.no_grad():
        logits = model(tokens)
    naive = NaiveModel(model)
    for b in range(2):
        torch.testing.assert_close(logits[b].double(), naive.forward(tokens[b]), atol=1e-5, rtol=1e-5)


def test_right_padding_and_batch_neighbours_do_not_leak():
    model = make_model()
    gen = torch.Generator().manual_seed(2)
    a = random_tokens(gen, model.config, 1, 12)
    batch = torch.cat([torch.cat([a, torch.zeros(1, 5, dtype=torch.long)], 1), random_tokens(gen, model.config, 1, 17)])
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[:1, :12], model(a), atol=1e-5, rtol=1e-5)


def test_paper_preset_counts_2_4b_non_embedding_parameters():
    with torch.device("meta"):
        model = Memory3(ModelConfig.from_preset("paper-2.4b"))
    # docs/paper.md: 44 x (2d^2 + 2 d d_h H_kv + 3 d W) = 2.43e9 plus the norms
    assert model.num_params() == 44 * (2 * 3200**2 + 2 * 3200 * 80 * 8 + 3 * 3200 * 3200) + (2 * 44 + 1) * 3200
    assert 2.4e9 < model.num_params() < 2.45e9
    assert model.num_params(non_embedding=False) == model.num_params() + 2 * 60416 * 3200


def test_tied_embeddings_share_one_matrix():
    model = make_model(tie_embeddings=True)
    assert model.lm_head is None
    assert "lm_head.weight" not in model.state_dict()
    untied = make_model(tie_embeddings=False)
    assert untied.num_params(False) - untied.num_params() == 2 * 128 * 32


def test_bad_inputs_raise_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.ones(1, model.config.max_seq_len + 1, dtype=torch.long))
