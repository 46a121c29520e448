import pytest

from handlers.base import ModelLoadError
from schemas.settings import ModelSettings
from worker.models import load_models


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_a_device_the_models_cannot_use_is_a_model_load_error_naming_it(device: str) -> None:
    settings = ModelSettings(device=device)

    with pytest.raises(ModelLoadError) as raised:
        load_models(settings)

    assert f"ENRICH_MODELS__DEVICE={device}" in str(raised.value)
