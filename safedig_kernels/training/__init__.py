"""Capture, TopK-SAE training and decoder-only adaptation (SafeDIG parts 1, 2 and 5).

Importing this package does not import diffusers; `capture` and `synthetic` do when used.
"""
from .adapt import AdaptConfig, AdaptResult, adapt_decoder
from .capture import CaptureConfig, PromptRecord, capture, load_pipeline, load_prompts
from .sae_train import TrainConfig, TrainResult, evaluate_sae, train_sae
from .store import ActivationStore, ActivationWriter, ManifestError, ShardError, SiteSpec, rebuild_manifest

__all__ = ["AdaptConfig", "AdaptResult", "adapt_decoder", "CaptureConfig", "PromptRecord", "capture",
           "load_pipeline", "load_prompts", "TrainConfig", "TrainResult", "evaluate_sae", "train_sae",
           "ActivationStore", "ActivationWriter", "ManifestError", "ShardError", "SiteSpec", "rebuild_manifest"]
