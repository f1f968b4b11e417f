"""Training: a deterministic, resumable trainer that runs as one process or under torchrun + DDP.

``config`` says what a run is (and holds the named recipes), ``inputs`` what the model is fed,
``distributed`` how ranks cooperate, ``checkpoint`` what survives a stop, ``loop`` the training
itself and ``plan`` what a run will cost before it starts.
"""

from .checkpoint import CHECKPOINT_NAME
from .config import RECIPES, CheckpointError, Recipe, TrainConfig, recipe_for_model
from .distributed import DistContext, DistributedFailure, MaskMismatchError, init_from_env, verify_identical_masks
from .inputs import prepare
from .loop import TrainingInterrupted, TrainResult, build_for, evaluate, train
from .plan import TrainPlan, estimate_step_seconds, make_plan

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "prepare",
    "build_for",
    "RECIPES",
    "Recipe",
    "recipe_for_model",
    "CheckpointError",
    "TrainingInterrupted",
    "DistContext",
    "DistributedFailure",
    "MaskMismatchError",
    "init_from_env",
    "verify_identical_masks",
    "TrainPlan",
    "make_plan",
    "estimate_step_seconds",
    "CHECKPOINT_NAME",
]
