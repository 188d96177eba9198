"""Observers behind one registry: ``build_observer("minmax" | "percentile" | "mse", ...)``."""
from .base import Observer, available_observers, build_observer, check_row_groups, register_observer
from .minmax import MinMaxObserver
from .pool import MseObserver, PercentileObserver, SamplePoolObserver, linear_quantile, mse_search

__all__ = [
    "Observer", "MinMaxObserver", "PercentileObserver", "MseObserver", "SamplePoolObserver",
    "build_observer", "register_observer", "available_observers", "check_row_groups",
    "linear_quantile", "mse_search",
]
