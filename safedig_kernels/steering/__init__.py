"""Steering policy: harmful-feature scoring and robustness-aware routing (SafeDIG parts 3 and 4)."""
from .routing import OPERATORS, RouteConfig, RoutingReport, route, write_steering_config
from .scoring import HarmfulRule, ScoringReport, score_features, select_harmful

__all__ = ["HarmfulRule", "ScoringReport", "score_features", "select_harmful", "OPERATORS", "RouteConfig",
           "RoutingReport", "route", "write_steering_config"]
