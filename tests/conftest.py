import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Keep hypothesis quick and deterministic in CI; a developer can raise the budget locally.
settings.register_profile(
    "ci", max_examples=int(os.environ.get("MPD_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
    derandomize=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> float:
    """Max abs difference relative to the output scale; the figure the exactness bar is about."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rel, f"relative max error {err:.3g} > {rel}"
    return err


@pytest.fixture
def close():
    return assert_close_to_scale
