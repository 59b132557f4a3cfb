"""The SafeDIG method as a library, one module per step, in the order a user runs them:

    prompts    labelled prompt files, labels and selectors
    capture    record a pipeline's activations at chosen sites into a store   (store: the directory format)
    train      TopK-SAE training on one site's activations, single process or DDP
    score      harmful-feature scoring: which latents fire more on unsafe prompts
    route      robustness-aware routing of (site, operator) pairs; returns the steering config
    adapt      decoder-only adaptation to a target risk domain, encoder frozen
    generate   generate with and without steering, measure what it changed   (report: its files)
    demo       all of the above on a built-in tiny FLUX
    synthetic, pipelines   the tiny stand-ins and the pipelines the steps run on

It uses the diffusers integration (`integrations.diffusers`: sites, runner, hooks) and never
the reverse. Names are imported on first use, so `import safedig_kernels.workflow` is cheap.
"""
from __future__ import annotations

from .._imports import lazy_exports

# The configs and results of every step; each step's function lives in its module
# (`workflow.capture.capture`, `workflow.route.route`, ...), whose name it shares.
_EXPORTS = {
    "PromptRecord": "prompts", "load_prompts": "prompts",
    "ActivationStore": "store", "ActivationWriter": "store", "ManifestError": "store", "ShardError": "store",
    "rebuild_manifest": "store", "SiteSpec": "store",
    "CaptureConfig": "capture",
    "TrainConfig": "train", "TrainResult": "train", "evaluate_sae": "train", "train_sae": "train",
    "HarmfulRule": "score", "ScoringReport": "score", "score_features": "score", "select_harmful": "score",
    "OPERATORS": "route", "RouteConfig": "route", "RoutingReport": "route", "write_steering_config": "route",
    "AdaptConfig": "adapt", "AdaptResult": "adapt", "adapt_decoder": "adapt",
    "GenerateConfig": "generate", "time_steps": "generate",
    "write_outputs": "report",
    "DemoConfig": "demo", "run_demo": "demo",
    "load_pipeline": "pipelines",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
