"""Reproduction of the paper's experiments (Table 1, the mask study, the ablation, Fig. 1)."""

from .reproduce import PROFILES, rerender_report, run_reproduction

__all__ = ["PROFILES", "run_reproduction", "rerender_report"]
