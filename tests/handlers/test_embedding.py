from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from handlers.base import ModelLoadError
from handlers.embedding import (
    DEFAULT_EMBEDDING_MODEL_ID,
    TextEmbedder,
    default_embedding_model_dir,
    mean_pool,
    product_text,
)

JEANS = "502 slim taper jeans. Attributes: colour: dark blue; material: denim."
TEXTS = [JEANS, "Linen shirt", "A long wool coat with a belt, two pockets and a wide collar."]


@pytest.fixture(scope="session")
def embedder() -> TextEmbedder:
    return TextEmbedder(model_dir=default_embedding_model_dir(), device="cpu")


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


def test_text_past_the_models_max_length_is_cut_off(embedder: TextEmbedder) -> None:
    long_text = "denim jeans " * 300

    embeddings = embedder.embed([long_text, long_text + "silk evening dress " * 50])

    assert embedder.max_length == 256
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-6)


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
    assert embedder.model_version.startswith(f"{DEFAULT_EMBEDDING_MODEL_ID}@")
    assert (default_embedding_model_dir() / "model.safetensors").is_file()


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

    embedder = TextEmbedder(model_dir=folder, device="cpu")
    embeddings = embedder.embed(TEXTS)

    assert embedder.model_id == "tiny-bert"
    assert embedder.dimension == 32
    assert embedder.max_length == 512
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


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
