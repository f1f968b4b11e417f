import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels are tested through Triton's interpreter, which must be chosen
# before any kernel is defined (at import of mpdcompress.kernels.triton_kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .helpers import write_fake_mnist  # noqa: E402

# Keep hypothesis quick and deterministic in CI; a developer can raise the budget locally.
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("MPD_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    # Gzipped, so the loader validates the format but does not expect the real release's digests.
    write_fake_mnist(tmp_path / "mnist", gz=True)
    monkeypatch.setenv("MPDCOMPRESS_DATA", str(tmp_path))
    return tmp_path
