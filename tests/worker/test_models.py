import subprocess
import sys

import pytest

from handlers.base import ModelLoadError
from schemas.settings import REPO_ROOT, ModelSettings
from worker.models import load_models


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_a_device_the_models_cannot_use_is_a_model_load_error_naming_it(device: str) -> None:
    settings = ModelSettings(device=device)

    with pytest.raises(ModelLoadError) as raised:
        load_models(settings)

    assert f"ENRICH_MODELS__DEVICE={device}" in str(raised.value)


def test_the_models_use_the_configured_number_of_cpu_threads() -> None:
    script = (
        "import torch; from schemas.settings import ModelSettings; "
        "from worker.models import load_models; "
        "load_models(ModelSettings(torch_threads=1)); print(torch.get_num_threads())"
    )

    finished = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().splitlines()[-1] == "1"
