"""A served model without the server: requests in, top-k original item ids out.

:class:`ServedModel` is what one Ray Serve replica holds (:mod:`cluster.serve` wraps it in a
deployment); it knows nothing of HTTP or Ray, so it is tested and benchmarked on its own. It loads
an export once, checks it against the dataset it was trained on (the dataset's id map turns
original item ids into the model's indices and back), and answers a batch of requests with one
forward pass.

A request is JSON: ``{"history": [original item ids, oldest first], "k": 10, "filter_seen": true}``.
Item ids are the input data's (strings, or integers for numeric ids); ids the model does not know
are ignored and counted; a history with no known item gets the training popularity ranking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from cluster.models import load_model
from data_pipeline.dataset import load_manifest, read_item_ids, train_item_counts
from data_pipeline.exports import check_export_fits_dataset
from distill.evaluate import model_scorer
from distill.recommend import ranked_once, top_k_items
from distill.sequences import left_pad_flat

FINGERPRINT_HEADER = "x-recdistill-fingerprint"
MAX_ID_BYTES = 64  # what one history entry may take in a request body, quotes and comma included


class BadRequest(ValueError):
    """A request the service refuses, with the HTTP status to answer and a message for the caller."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    history: list[Union[StrictStr, StrictInt]] = Field(default_factory=list, description="Original item ids, oldest first.")
    k: StrictInt = 10
    filter_seen: StrictBool = True


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request with its history in the model's item indices (unknown ids dropped and counted)."""

    request: RecommendRequest
    known: list[int]

    @property
    def unknown(self) -> int:
        return len(self.request.history) - len(self.known)


class ServedModel:
    """One exported model ready to answer requests (see the module docstring)."""

    def __init__(self, export_url: str, data_url: str, storage_options: Optional[dict[str, Any]] = None,
                 device: str = "cpu", max_k: int = 100, max_history: int = 20_000):
        model, meta = load_model(export_url, storage_options)
        manifest = load_manifest(data_url, storage_options)
        check_export_fits_dataset(meta, manifest, export_url)
        self.item_ids: list[str] = read_item_ids(data_url, storage_options, manifest)
        self.index = {raw: dense for dense, raw in enumerate(self.item_ids, start=1)}
        self.device = torch.device(device)
        self.popularity = torch.from_numpy(train_item_counts(data_url, manifest["num_items"], storage_options)).float()
        self.by_popularity = ranked_once(self.popularity).tolist()  # the ranking of a history with no known item
        self.popularity_scores = self.popularity[self.by_popularity].tolist()
        self.scorer = model_scorer(model.to(self.device), meta["model"]["max_len"])
        self.fingerprint: str = meta["fingerprint"]
        self.params = sum(p.numel() for p in model.parameters())
        self.num_items: int = manifest["num_items"]
        self.max_k = min(max_k, self.num_items)
        self.max_history = max_history
        # A body this large cannot be a history within the limit (ids of up to ~60 characters): refused before
        # it is parsed, since parsing runs on the replica's event loop, where every other request waits.
        self.max_body_bytes = MAX_ID_BYTES * max_history + 4096

    def info(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "params": self.params, "num_items": self.num_items,
                "max_k": self.max_k, "max_history": self.max_history, "device": str(self.device)}

    def parse(self, body: bytes) -> ParsedRequest:
        """A request body checked in full, its item ids mapped (here, before batching: this work is per request);
        :class:`BadRequest` says what is wrong with it."""
        if len(body) > self.max_body_bytes:
            raise BadRequest(self.too_large(len(body)), 413)
        try:
            payload = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise BadRequest("the body is not valid JSON: nested too deeply") from None
        if not isinstance(payload, dict):
            raise BadRequest('the body must be a JSON object such as {"history": ["1193", "661"], "k": 10}')
        history = payload.get("history")
        if isinstance(history, list) and len(history) > self.max_history:  # before validating every entry of it
            raise BadRequest(f"history has {len(history)} items; at most {self.max_history} are accepted (serve.max_history; "
                             "the model reads the most recent ones, the rest only filter seen items)", 422)
        try:
            request = RecommendRequest.model_validate(payload)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            raise BadRequest(f"invalid request: {problems} (fields: history, k, filter_seen)", 422) from None
        if not 1 <= request.k <= self.max_k:
            raise BadRequest(f"k must be between 1 and {self.max_k}, got {request.k}", 422)
        index = self.index
        return ParsedRequest(request, [index[raw] for raw in map(str, request.history) if raw in index])

    def too_large(self, size: int) -> str:
        """The message for a body over :attr:`max_body_bytes` (also what the endpoint answers to a Content-Length over it)."""
        return (f"the body has {size:,} bytes; at most {self.max_body_bytes:,} are accepted "
                f"(a history of at most {self.max_history} items)")

    def recommend(self, requests: list[ParsedRequest]) -> list[dict[str, Any]]:
        """Answers in request order: ``items`` (original ids, best first), their ``scores``, ``unknown_items``
        (ids ignored) and ``ranking`` ("model", or "popularity" for a history with no known item)."""
        answers: list[Optional[dict[str, Any]]] = [None] * len(requests)
        personal = [i for i, r in enumerate(requests) if r.known]
        if personal:
            known = [requests[i].known for i in personal]
            lengths = np.array([len(h) for h in known])
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            flat = np.fromiter((item for h in known for item in h), dtype=np.int64, count=int(offsets[-1]))
            histories = torch.from_numpy(left_pad_flat(flat, offsets, int(lengths.max()))).to(self.device)
            with torch.no_grad():
                scores = self.scorer(histories).float()
            filter_seen = torch.tensor([requests[i].request.filter_seen for i in personal], device=self.device)
            ranked = top_k_items(scores, histories, max(requests[i].request.k for i in personal), filter_seen)
            for i, (items, values) in zip(personal, ranked):
                k = requests[i].request.k
                answers[i] = self._answer(requests[i], items[:k], values[:k], "model")
        for i, r in enumerate(requests):
            if answers[i] is None:  # nothing known of this user (so nothing seen): the popularity ranking, made at load
                k = r.request.k
                answers[i] = self._answer(r, self.by_popularity[:k], self.popularity_scores[:k], "popularity")
        return answers  # type: ignore[return-value]

    def _answer(self, r: ParsedRequest, items: list[int], scores: list[float], ranking: str) -> dict[str, Any]:
        return {"items": [self.item_ids[i - 1] for i in items], "scores": scores, "unknown_items": r.unknown, "ranking": ranking}
