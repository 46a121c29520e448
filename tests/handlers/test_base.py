from pathlib import Path

from handlers.base import model_version


def _model_folder(root: Path) -> Path:
    folder = root / "model"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"\x00\x01weights")
    (folder / "config.json").write_text('{"threshold": 0.4}')
    (folder / "MODEL_CARD.md").write_text("# A model\n")
    return folder


def test_a_changed_weights_file_gives_a_new_model_version(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    before = model_version("segmenter", folder)

    (folder / "weights.pt").write_bytes(b"\x00\x02weights")

    assert model_version("segmenter", folder) != before


def test_a_reworded_model_card_keeps_the_model_version(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    before = model_version("segmenter", folder)

    (folder / "MODEL_CARD.md").write_text("# A model\n\nNew figures from enrich eval.\n")

    assert model_version("segmenter", folder) == before
    assert before.startswith("segmenter@") and len(before.split("@")[1]) == 12
