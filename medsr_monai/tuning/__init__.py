"""Optuna studies over the bundles' own configs (``medsr tune``)."""

from .reporter import OptunaReporter
from .space import Objective, SearchSpace, SpaceError, load_space
from .study import TuneError, TuneSettings, tune, write_best_override
from .trial import TrialSetup, run_trial

__all__ = ["OptunaReporter", "Objective", "SearchSpace", "SpaceError", "load_space", "TuneError", "TuneSettings",
           "tune", "write_best_override", "TrialSetup", "run_trial"]
