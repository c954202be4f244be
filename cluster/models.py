"""Models in and out of exports: the bridge between the model code (:mod:`distill.model`)
and the export format (:mod:`data_pipeline.exports`), which know nothing of each other."""

from __future__ import annotations

from typing import Any, Optional

import torch

from data_pipeline.exports import ExportError, ExportMissing, check_export_fits_dataset, load_export, save_export
from distill.config import ModelConfig
from distill.model import SequentialRecommender
from distill.rating_model import RatingModel


def save_model(
    url: str,
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    num_items: int,
    info: dict[str, Any],
    storage_options: Optional[dict[str, Any]] = None,
) -> str:
    """Export a model's weights with its config; returns the export's fingerprint."""
    return save_export(url, state_dict, model_cfg.model_dump(mode="json"), num_items, info, storage_options)


def load_model(url: str, storage_options: Optional[dict[str, Any]] = None) -> tuple[SequentialRecommender, dict[str, Any]]:
    """An exported model as a plain (unsharded) module in eval mode, on CPU: a next-item model, or a rating
    model when the export says so (``rating_values`` in its metadata)."""
    state, meta = load_export(url, storage_options)
    model = build_model(ModelConfig.model_validate(meta["model"]), meta["num_items"], meta.get("rating_values"))
    load_weights(model, state)
    return model.eval(), meta


def build_model(cfg: ModelConfig, num_items: int, rating_values: Optional[list[float]] = None) -> torch.nn.Module:
    """The next-item model, or (with the dataset's ``rating_values``) the rating task's."""
    if rating_values:
        return RatingModel(cfg, num_items, len(rating_values))
    return SequentialRecommender(cfg, num_items)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an export's tensors; with tied embeddings ``output.weight`` comes from ``item_emb.weight``."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_ok = set(model.tied_weight_keys) if model.cfg.tied_embeddings else set()
    if unexpected or set(missing) - tied_ok:
        raise ExportError(f"export does not fit the model: missing {missing}, unexpected {unexpected}")


def load_scorers(urls: list[str], dataset: dict[str, Any], storage_options=None, device: torch.device | str = "cpu"):
    """Next-item scorers of exported models, each checked against its fingerprint and the dataset.
    Returns ``(scorers, total parameters, fingerprints)``."""
    from data_pipeline.exports import check_export_fits_dataset
    from distill.evaluate import model_scorer

    scorers, params, fingerprints = [], 0, []
    for url in urls:
        model, meta = load_model(url, storage_options)
        check_export_fits_dataset(meta, dataset, url)
        scorers.append(model_scorer(model.to(device), meta["model"]["max_len"]))
        params += sum(p.numel() for p in model.parameters())
        fingerprints.append(meta["fingerprint"])
    return scorers, params, fingerprints


def mixture_scorer(scorers: list):
    """One scorer, or the mixture of several (a teacher ensemble, :func:`distill.ensemble.ensemble_log_probs`)."""
    from distill.ensemble import ensemble_log_probs

    if len(scorers) == 1:
        return scorers[0]

    def mixture(histories: torch.Tensor) -> torch.Tensor:
        return ensemble_log_probs(score(histories) for score in scorers)

    return mixture


def load_available(exports: dict[str, str], dataset: dict[str, Any], storage_options=None):
    """The exports among ``exports`` (name -> folder) that can be scored: name -> (folder, model, meta), each checked
    against the dataset (a model of another dataset is an error); and name -> why each other one cannot
    ("not trained yet", or "damaged: ...")."""
    loaded: dict[str, tuple[str, torch.nn.Module, dict[str, Any]]] = {}
    unavailable: dict[str, str] = {}
    for name, folder in exports.items():
        try:
            model, meta = load_model(folder, storage_options)
        except ExportMissing:
            unavailable[name] = "not trained yet"
            continue
        except ExportError as exc:
            unavailable[name] = f"damaged: {exc}"
            continue
        check_export_fits_dataset(meta, dataset, folder)
        loaded[name] = (folder, model, meta)
    return loaded, unavailable
