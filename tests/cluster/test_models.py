import pytest
import torch

from data_pipeline import fsio
from distill.config import ModelConfig
from data_pipeline.exports import ExportError, load_export, read_export_meta, read_export_tensor, verify_export
from cluster.models import load_model, save_model
from distill.model import SequentialRecommender

CFG = ModelConfig(d_model=16, num_layers=1, num_heads=2, ffn_dim=32, max_len=6, dropout=0.0)


@pytest.mark.parametrize("base", ["local", "memory"])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_scores(tmp_path, base, tied):
    cfg = CFG.model_copy(update={"tied_embeddings": tied})
    url = str(tmp_path / "teacher") if base == "local" else f"memory://export-test-{tied}/teacher"
    torch.manual_seed(0)
    model = SequentialRecommender(cfg, 30).eval()
    fp = save_model(url, model.state_dict(), cfg, 30, {"role": "teacher", "epoch": 3})
    loaded, meta = load_model(url)
    assert meta["fingerprint"] == fp and meta["epoch"] == 3
    x = torch.randint(1, 31, (4, 6))
    assert torch.equal(model.score_last(x), loaded.score_last(x))
    assert verify_export(url)["fingerprint"] == fp


def test_mixed_dim_round_trip_keeps_the_item_order(tmp_path):
    cfg = ModelConfig(**{**CFG.model_dump(), "item_dims": [{"items": 10, "dim": 16}, {"dim": 4}]})
    torch.manual_seed(0)
    model = SequentialRecommender(cfg, 30).eval()
    model.item_table.set_item_order(torch.randperm(31).float())  # not the id order
    save_model(str(tmp_path / "s"), model.state_dict(), cfg, 30, {})
    loaded, _ = load_model(str(tmp_path / "s"))
    assert loaded.item_table.item_row.dtype == torch.long
    assert torch.equal(loaded.item_table.item_row, model.item_table.item_row)
    x = torch.randint(1, 31, (4, 6))
    assert torch.equal(model.score_last(x), loaded.score_last(x))


@pytest.mark.parametrize("base", ["local", "memory"])
def test_one_tensor_is_read_without_loading_the_rest(tmp_path, base):
    url = str(tmp_path / "t") if base == "local" else "memory://export-tensor-test/t"
    model = SequentialRecommender(CFG, 30)
    save_model(url, model.state_dict(), CFG, 30, {})
    torch.testing.assert_close(read_export_tensor(url, "item_emb.weight"), model.item_emb.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(read_export_tensor(url, "pos_emb.weight"), model.pos_emb.weight.detach(), rtol=0, atol=0)
    with pytest.raises(ExportError, match=r"no tensor 'nope'.*item_emb\.weight"):
        read_export_tensor(url, "nope")


def test_tampered_weights_are_refused(tmp_path):
    url = str(tmp_path / "t")
    model = SequentialRecommender(CFG, 30)
    save_model(url, model.state_dict(), CFG, 30, {})
    fs, path = fsio.get_fs(fsio.join(url, "model.safetensors"))
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(ExportError, match="fingerprint"):
        load_export(url)
    with pytest.raises(ExportError, match="fingerprint"):
        verify_export(url)


def test_missing_export_names_the_url(tmp_path):
    with pytest.raises(ExportError, match=str(tmp_path / "nothing")):
        read_export_meta(str(tmp_path / "nothing"))


def test_an_export_from_another_catalog_or_dataset_does_not_fit():
    from data_pipeline.exports import check_export_fits_dataset

    dataset = {"num_items": 30, "fingerprint": "a" * 64}
    check_export_fits_dataset({"num_items": 30, "dataset_fingerprint": "a" * 64}, dataset, "runs/x/teacher")
    check_export_fits_dataset({"num_items": 30}, dataset, "runs/x/teacher")  # no provenance: the catalog size decides
    with pytest.raises(ExportError, match="runs/x/teacher scores 31 items but the dataset has 30"):
        check_export_fits_dataset({"num_items": 31, "dataset_fingerprint": "a" * 64}, dataset, "runs/x/teacher")
    with pytest.raises(ExportError, match="runs/x/teacher was trained on dataset bbbbbbbbbbbb"):
        check_export_fits_dataset({"num_items": 30, "dataset_fingerprint": "b" * 64}, dataset, "runs/x/teacher")
