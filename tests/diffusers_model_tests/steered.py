"""A pytest plugin that runs diffusers' own model tests with SafeDIG installed on the models.

    git clone https://github.com/huggingface/diffusers && cd diffusers   # tests of a nearby version
    PYTHONPATH=$SAFEDIG/tests/diffusers_model_tests python -m pytest -p steered \\
        tests/models/transformers/test_models_transformer_flux.py \\
        tests/models/transformers/test_models_transformer_sd3.py

Every transformer class diffusers describes (its blocks are in `TransformerBlockRegistry`) that a
test class builds is replaced, for that test class, by a subclass that installs steering when a
model is made (`__init__`, or `from_pretrained` after its weights are loaded): every stream of
every block, beta = gamma = 0 and tau = -1 (every token through the gate), which promises the
output unchanged. So each of diffusers' checks (outputs, save/load, dtypes, offloading, LoRA,
compile, training, ...) runs on a steered model and must pass as it does unsteered.
`SAFEDIG_STEERED_FUSED=0` runs the PyTorch reference instead of the ops. Not run in CI (it
needs a diffusers checkout); docs/real-models.md records the last run.
"""
from __future__ import annotations

import functools
import os

import torch

import safedig_kernels as sk
from safedig_kernels.integrations.diffusers import SafeDIGConfig, SiteConfig, apply_safedig, safedig_handle
from safedig_kernels.integrations.diffusers.sites import SiteSpec, block_layout, block_stacks, resolve_site

_STEERED: dict[type, type] = {}


def _zero_strength_config(model: torch.nn.Module) -> SafeDIGConfig:
    sites = []
    for stack, blocks in block_stacks(model).items():
        for i, block in enumerate(blocks):
            layout = block_layout(block)
            for stream in ("image", "text"):
                if layout.index(stream) is None:
                    continue
                spec = SiteSpec(f"{stack}.{i}", stream)
                width = resolve_site(spec, model).width
                if width is not None:
                    sites.append(SiteConfig(spec.key, sk.random_sae(width, 32, 4, harmful=[0, 5], seed=i),
                                            beta=0.0, gamma=0.0, tau=-1.0))
    return SafeDIGConfig(sites, use_fused_ops=os.environ.get("SAFEDIG_STEERED_FUSED", "1") != "0")


def _steer(model):
    real = all(p.device.type != "meta" for p in model.parameters())
    if real and safedig_handle(model) is None and block_stacks(model):
        apply_safedig(model, _zero_strength_config(model))
    return model


def steered(cls: type) -> type:
    """`cls` as a subclass that steers every model it makes (the same name, so configs and files
    name the original class)."""
    if cls not in _STEERED:
        class Steered(cls):
            @functools.wraps(cls.__init__)  # diffusers reads the config's keys from its signature
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                _steer(self)

            @classmethod
            def from_pretrained(klass, *args, **kwargs):
                return _steer(super().from_pretrained(*args, **kwargs))

        Steered.__name__ = Steered.__qualname__ = cls.__name__
        _STEERED[cls] = Steered
    return _STEERED[cls]


def pytest_collection_modifyitems(config, items):
    for item in items:
        owner = getattr(item, "cls", None)
        prop = getattr(owner, "model_class", None) if owner is not None else None
        fget = owner.__dict__.get("model_class") if owner is not None else None
        for klass in getattr(owner, "__mro__", ()):
            fget = klass.__dict__.get("model_class")
            if fget is not None:
                break
        if isinstance(fget, property):
            try:
                prop = fget.fget(None)
            except Exception:
                continue
        if isinstance(prop, type) and issubclass(prop, torch.nn.Module) and prop not in _STEERED.values():
            owner.model_class = property(lambda self, c=steered(prop): c)


def pytest_report_header(config):
    return "SafeDIG: every described transformer steered at beta = gamma = 0 on every stream of every block"
