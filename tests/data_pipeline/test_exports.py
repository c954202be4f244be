

def test_a_streamed_export_is_an_ordinary_export(tmp_path):
    """Written one tensor at a time (the 1B teacher's way), it loads, verifies and fingerprints like any export."""
    import pytest
    import torch

    from data_pipeline.exports import ExportError, load_export, save_export_streaming, verify_export

    tensors = {"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7), "order": torch.arange(4)}
    layout = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    config = {"d_model": 5}
    fingerprint = save_export_streaming(str(tmp_path / "m"), layout, iter(tensors.values()), config, 4, {"role": "x"})
    loaded, meta = load_export(str(tmp_path / "m"))
    assert meta["fingerprint"] == fingerprint and verify_export(str(tmp_path / "m"))["role"] == "x"
    assert all(torch.equal(loaded[name], t) for name, t in tensors.items()) and loaded["order"].dtype == torch.int64
    with pytest.raises(ExportError, match="layout says"):
        save_export_streaming(str(tmp_path / "n"), layout, iter([torch.randn(5, 3), *list(tensors.values())[1:]]), config, 4, {})
    assert not (tmp_path / "n" / "model.safetensors").exists()  # nothing half-written is visible
