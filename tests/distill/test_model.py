"""SequentialRecommender: shapes, causality, padding handling, and that it can learn."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.config import ModelConfig
from distill.model import MixedDimItemTable, SequentialRecommender, item_bands
from distill.objectives import full_softmax_ce
from distill.sequences import left_pad, next_item_batch

NUM_ITEMS = 30
CFG = ModelConfig(d_model=16, num_layers=2, num_heads=2, ffn_dim=32, max_len=12, dropout=0.1)
# The same model with a mixed-dimension item table: 8 items 16 wide, 10 items 8 wide, the rest 4 wide.
MIXED = ModelConfig(**{**CFG.model_dump(), "item_dims": [{"items": 8, "dim": 16}, {"items": 10, "dim": 8}, {"dim": 4}]})
BOTH_TABLES = pytest.mark.parametrize("cfg", [CFG, MIXED], ids=["uniform", "mixed_dims"])


def make_model(cfg: ModelConfig = CFG, num_items: int = NUM_ITEMS, seed: int = 0) -> SequentialRecommender:
    torch.manual_seed(seed)
    return SequentialRecommender(cfg, num_items).eval()


@BOTH_TABLES
def test_output_shapes(cfg):
    model = make_model(cfg)
    ids = left_pad([[1, 2, 3], [4, 5, 6, 7, 8]], 8)
    hidden = model(ids)
    assert hidden.shape == (2, 8, cfg.d_model)
    assert model.scores(hidden).shape == (2, 8, NUM_ITEMS + 1)
    assert model.last_hidden(ids).shape == (2, cfg.d_model)
    assert model.score_last(ids).shape == (2, NUM_ITEMS + 1)
    torch.testing.assert_close(model.last_hidden(ids), hidden[:, -1])


def test_rejects_sequences_longer_than_max_len():
    with pytest.raises(ValueError, match="max_len"):
        make_model()(torch.ones(1, CFG.max_len + 1, dtype=torch.long))


def test_same_seed_same_weights():
    a, b = make_model(seed=3), make_model(seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_tied_and_untied_output():
    tied = make_model()
    assert tied.output.weight is tied.item_emb.weight
    ids = left_pad([[1, 2, 3]], 4)
    h = tied.last_hidden(ids)
    torch.testing.assert_close(tied.scores(h)[:, 1:], h @ tied.item_emb.weight[1:].T)

    untied = make_model(CFG.model_copy(update={"tied_embeddings": False}))
    assert untied.output.weight is not untied.item_emb.weight


def test_padding_row_of_item_embedding_is_zero():
    assert torch.count_nonzero(make_model().item_emb.weight[0]) == 0


def test_item_bands_fill_in_order_and_drop_empty_bands():
    bands = MIXED.item_dims
    assert item_bands(bands, 30) == [(8, 16), (10, 8), (12, 4)]
    assert item_bands(bands, 12) == [(8, 16), (4, 8)]  # a smaller catalog: the last band is empty
    assert item_bands(bands, 5) == [(5, 16)]


def test_mixed_table_puts_popular_items_in_the_wide_band():
    model = make_model(MIXED)
    table = model.item_table
    counts = torch.zeros(NUM_ITEMS + 1)
    counts[1:] = torch.randperm(NUM_ITEMS).float()  # distinct counts, a random popularity order
    table.set_item_order(counts)
    by_popularity = (torch.argsort(counts[1:], descending=True) + 1).tolist()
    with torch.no_grad():
        vectors = table()
    assert vectors.shape == (NUM_ITEMS + 1, MIXED.d_model)
    assert torch.count_nonzero(vectors[0]) == 0  # padding
    # The 8 most popular items are band 0's rows (full width, no projection), in popularity order.
    torch.testing.assert_close(vectors[by_popularity[:8]], table.band0)
    # The least popular are the 4-wide band projected up: rank <= 4 (of 16) as a matrix.
    rare = vectors[by_popularity[18:]]
    torch.testing.assert_close(rare, table.band2 @ table.proj2)
    assert torch.linalg.matrix_rank(rare) <= 4
    # Embedding and scoring use the same (tied) vectors.
    ids = left_pad([[by_popularity[0], by_popularity[-1]]], 4)
    h = model.last_hidden(ids)
    torch.testing.assert_close(model.scores(h)[:, 1:], h @ vectors[1:].T)


def test_mixed_table_rejects_counts_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"shape \(31,\)"):
        make_model(MIXED).item_table.set_item_order(torch.ones(NUM_ITEMS))


def test_mixed_table_projected_rows_start_at_the_uniform_table_scale():
    torch.manual_seed(0)
    table = MixedDimItemTable(4000, 64, [(1000, 64), (3000, 8)])
    with torch.no_grad():
        vectors = table()
    wide, narrow = vectors[1:1001].std().item(), vectors[1001:].std().item()
    assert 0.015 < wide < 0.025 and 0.015 < narrow < 0.025, (wide, narrow)


@BOTH_TABLES
def test_causal_future_items_do_not_change_the_past(cfg):
    model = make_model(cfg)
    ids = left_pad([[3, 1, 4, 1, 5, 9, 2, 6]], 10)
    changed = ids.clone()
    changed[0, -2:] = torch.tensor([7, 8])  # change the last two items only
    with torch.no_grad():
        h, h_changed = model(ids), model(changed)
    torch.testing.assert_close(h[:, :-2], h_changed[:, :-2], rtol=0, atol=1e-6)
    assert not torch.allclose(h[:, -1], h_changed[:, -1])


@BOTH_TABLES
def test_left_padding_invariance(cfg):
    model = make_model(cfg)
    seq = [5, 2, 9, 11, 7]
    with torch.no_grad():
        short = model.last_hidden(left_pad([seq], len(seq)))  # no padding at all
        padded = model.last_hidden(left_pad([seq], CFG.max_len))
        in_batch = model.last_hidden(left_pad([seq, list(range(1, 13))], CFG.max_len))[:1]
    torch.testing.assert_close(short, padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(short, in_batch, rtol=0, atol=1e-5)


@BOTH_TABLES
def test_padding_column_is_never_ranked(cfg):
    model = make_model(cfg)
    scores = model.score_last(left_pad([[1, 2], [3], []], 5))
    assert torch.all(scores[:, 0] < scores[:, 1:].min())
    assert torch.all(scores.argsort(dim=1, descending=True)[:, -1] == 0)
    # Zero probability, and p * log p stays finite (no 0 * -inf).
    log_p = scores.log_softmax(-1)
    assert torch.all(log_p[:, 0].exp() == 0)
    assert torch.isfinite((torch.zeros_like(log_p) * log_p).sum())


def test_attention_mask_is_causal_hides_padding_keys_and_never_leaves_a_row_empty():
    is_item = torch.tensor([[False, False, True, True], [False, False, False, False]])
    mask = SequentialRecommender._attention_mask(is_item)[:, 0]  # (B, L, L)
    assert mask.any(-1).all()  # some backends return NaN for an all-masked softmax row
    assert mask[0].tolist() == [
        [True, False, False, False],  # padding queries see only themselves
        [False, True, False, False],
        [False, False, True, False],  # real queries see earlier real items
        [False, False, True, True],
    ]
    assert torch.equal(mask[1], torch.eye(4, dtype=torch.bool))


@BOTH_TABLES
def test_fully_padded_rows_give_no_nan_in_train_mode(cfg):
    model = make_model(cfg).train()
    ids = torch.zeros(3, 6, dtype=torch.long)
    ids[1, -1] = 4  # one real item among padding rows
    hidden = model(ids)
    assert torch.isfinite(hidden).all()
    loss = model.scores(hidden).logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_learns_a_deterministic_successor_task():
    """Item i is always followed by i + 1 (wrapping within 1..N): a tiny model must learn it."""
    torch.manual_seed(0)
    n_items, max_len = 12, 8
    cfg = ModelConfig(d_model=32, num_layers=1, num_heads=2, ffn_dim=64, max_len=max_len, dropout=0.0)
    model = SequentialRecommender(cfg, n_items)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def successor_run(start: int, length: int) -> list[int]:
        return [(start + k) % n_items + 1 for k in range(length)]

    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, n_items, (32,), generator=gen).tolist()
        lengths = torch.randint(2, max_len + 2, (32,), generator=gen).tolist()
        inputs, targets = next_item_batch([successor_run(s, n) for s, n in zip(starts, lengths)], max_len)
        loss = full_softmax_ce(model.scores(model(inputs)).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()
    histories = [successor_run(s, 1 + s % 5) for s in range(n_items)]
    with torch.no_grad():
        predicted = model.score_last(left_pad(histories, max_len)).argmax(-1)
    expected = torch.tensor([h[-1] % n_items + 1 for h in histories])
    assert (predicted == expected).float().mean() >= 0.9
    assert loss.item() < 0.5


_ZERO3_SCRIPT = r"""
import torch, deepspeed
from distill.config import ModelConfig
from distill.model import MixedDimItemTable, SequentialRecommender, item_bands
from distill.objectives import full_softmax_ce
from distill.sequences import next_item_batch

deepspeed.init_distributed(dist_backend="gloo")
cfg = ModelConfig(d_model=16, num_layers=2, num_heads=2, ffn_dim=32, max_len=8, dropout=0.0)
ds_cfg = {"train_batch_size": 4, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}
torch.manual_seed(0)
plain = SequentialRecommender(cfg, 20)
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
    model = SequentialRecommender(cfg, 20)
assert model.item_emb.weight.numel() == 0, "not partitioned"
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters())), "init differs"
x, y = next_item_batch([[1, 2, 3, 4], [5, 6, 7], [2, 3], [9, 10, 11, 12, 13]], 8)


def assert_trains(engine):
    losses = []
    for _ in range(5):
        # scores() is called outside the model's forward: the item table must still be gathered.
        loss = full_softmax_ce(engine.module.scores(engine(x)).flatten(0, 1), y.flatten())
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, model_parameters=model.parameters())
assert_trains(engine)

# A mixed-dimension item table: its bands and projections are gathered inside its own forward.
mixed_cfg = ModelConfig(**{**cfg.model_dump(), "item_dims": [{"items": 6, "dim": 16}, {"dim": 4}]})
torch.manual_seed(0)
plain = SequentialRecommender(mixed_cfg, 20)
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
    model = SequentialRecommender(mixed_cfg, 20)
assert model.item_table.band0.numel() == 0, "not partitioned"
engine, *_ = deepspeed.initialize(model=model, config=ds_cfg, model_parameters=model.parameters())
with torch.no_grad():
    torch.testing.assert_close(engine.module.scores(engine(x)), plain.scores(plain(x)))
assert_trains(engine)
print("ZERO3_OK")
"""


@pytest.mark.integration
def test_builds_and_trains_under_deepspeed_zero3_init(tmp_path):
    """Parameters created under deepspeed.zero.Init: same init as a plain build, and it trains.

    Runs in a subprocess (single-rank gloo on CPU) so the process-global distributed
    state stays out of the test session. The first run on a machine may JIT-compile
    DeepSpeed's CPU shared-memory op.
    """
    from cluster.ray_setup import free_port

    port = free_port()
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    script = tmp_path / "zero3_check.py"
    script.write_text(_ZERO3_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ZERO3_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
