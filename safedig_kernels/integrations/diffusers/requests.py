"""Which rows of a transformer call are which request, and which are conditional: one rule,
applied at every call from what that call shows, with nothing carried between pipeline calls.

The rule (README.md, "Per request in a batch", says it for users). A site sees a batch of `rows` rows.

- `n` requests are declared (`handle.set_requests`, one entry per image a pipeline call makes):
  `rows == n` is an unguided call, or one branch of guidance run as separate calls (FLUX true
  CFG), and row i is request i; `rows == 2n` is a guided batch `[uncond; cond]`, and request i
  is rows i and n + i. Any other count is refused, naming the site and both sizes.
- No requests: every row takes the site's own values; only a `cfg="cond"` site must know which
  rows are conditional.
- A family whose pipelines batch `[cond; uncond]` (Z-Image, DiT: `Family.cfg ==
  "batched_cond_first"`) has its conditional rows first; the rest of the rule is the same.
- A model whose pipelines guide by separate calls (FLUX true CFG) or by a guidance embedding
  (`Family.cfg == "separate"`) never sees a guided batch: every call has `n` rows.
- Where the model's pipelines batch guidance as `[uncond; cond]` (`Family.cfg == "batched"`),
  the call also reads whether the pipeline running it guides right now
  (`do_classifier_free_guidance`, which a pipeline sets at the start of each of its calls; SD3's
  extra skip-layer call is conditional only). The pipeline running it is the one whose
  `__call__` is on the call stack (`calling_pipeline`): a second pipeline built from the same
  components is read, not the one passed to `apply_safedig`. Where the stack cannot be read (the
  transformer compiled whole traces this), the pipeline passed to `apply_safedig` is read. A
  guided call must then have `2n` rows (an even number without requests): one prompt with two
  requests declared is refused rather than read as two unguided rows, which would steer the
  negative prompt's row.
- A `cfg="cond"` site with no requests on a call whose guidance is unknown (no pipeline running
  it, none passed, or one that never ran) is refused: it cannot tell which rows are conditional.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..._checks import strength

__all__ = ["REQUEST_ROWS", "RowLayout", "row_layout", "pipeline_guides", "calling_pipeline", "request_column"]

# Rows of a site's per-request table; a NaN strength means "this site's own value", so a later
# set_site still reaches the requests that left it unset.
REQUEST_ROWS = ("beta", "gamma", "tau", "enabled")


@dataclass(frozen=True)
class RowLayout:
    """How a call's rows map to requests: `groups` copies of the requests (1, or 2 for a guided
    batch), the conditional rows being `cond` (a slice: the second half of `[uncond; cond]`, the
    first of `[cond; uncond]`, all rows of an unguided call)."""

    groups: int
    cond: slice


def row_layout(rows: int, requests: Optional[int], guided: Optional[bool], site: str,
               cfg: str = "batched", need_cond: bool = False) -> RowLayout:
    """The rule of the module docstring for one site call; `cfg` is the model family's
    (`families.Family.cfg`): a guided batch is `[cond; uncond]` for "batched_cond_first".
    `need_cond`: the caller steers the conditional rows only (`cfg="cond"`)."""
    half = None
    if requests is None and need_cond and guided is None:
        raise RuntimeError(f"SafeDIG site {site!r} (cfg='cond') cannot tell which rows of this call are conditional: "
                           f"no pipeline is running it (or the one passed to apply_safedig never ran). Call the "
                           f"transformer from its pipeline, or declare the requests (set_requests)")
    if requests is None:
        if not guided:
            return RowLayout(1, slice(None))
        if rows % 2:
            raise RuntimeError(f"SafeDIG site {site!r}: the pipeline guides, so the batch must be [uncond; cond] "
                               f"with an even number of rows, but it has {rows}")
        half = rows // 2
    n = requests
    if half is None and rows == 2 * n and guided is not False:
        half = n
    if half is not None:
        return RowLayout(2, slice(None, half) if cfg == "batched_cond_first" else slice(half, None))
    if rows == n and not guided:
        return RowLayout(1, slice(None))
    if guided:
        expected = f"a guided batch [uncond; cond] of 2 x {n} = {2 * n} rows"
    elif guided is None:
        expected = f"{n} rows (one per request) or {2 * n} (a guided batch [uncond; cond])"
    else:
        expected = f"{n} rows (one per request; this call is not a guided batch [uncond; cond])"
    raise RuntimeError(f"SafeDIG site {site!r}: {n} requests are set (set_requests), so the batch must be {expected}, "
                       f"but it has {rows}; set one value per image this call generates (prompts x "
                       f"num_images_per_prompt), or clear_requests()")


def pipeline_guides(pipeline, kwargs: dict) -> Optional[bool]:
    """Whether `pipeline` runs this transformer call as a guided batch `[uncond; cond]`, read from
    the pipeline's own state for its current call; None when it cannot say."""
    if pipeline is None or kwargs.get("skip_layers") is not None:  # SD3's skip-layer call: cond rows only
        return None if pipeline is None else False
    try:
        return bool(pipeline.do_classifier_free_guidance)
    except AttributeError:  # not guided by CFG, or never called (its guidance scale is not set)
        return None


def calling_pipeline(limit: int = 64):
    """The diffusers pipeline whose `__call__` is running on this thread's stack (the innermost),
    or None: how a transformer call knows which pipeline made it without any pipeline method
    replaced. Eager only (a traced frame has no stack to read)."""
    from diffusers import DiffusionPipeline

    frame = sys._getframe(1)
    for _ in range(limit):
        if frame is None:
            return None
        if frame.f_code.co_name == "__call__":
            owner = frame.f_locals.get("self")
            if isinstance(owner, DiffusionPipeline):
                return owner
        frame = frame.f_back
    return None


def request_column(value, name: str) -> list[float]:
    """One `set_requests` argument as one float per request: strengths by the one rule, `enabled`
    as bools (1.0 / 0.0); errors name the argument and the request's index."""
    label = f"set_requests.{name}"
    if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):  # numpy
        value = torch.as_tensor(value)
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{label} must be 1-D, one entry per request, got shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{label} must be a sequence or a 1-D tensor, one entry per request, "
                        f"got {type(value).__name__}")
    if name != "enabled":
        return [strength(v, name, f"{label}[{i}]") for i, v in enumerate(value)]
    for i, v in enumerate(value):
        if not isinstance(v, bool):
            raise TypeError(f"{label}[{i}] must be a bool, got {v!r} ({type(v).__name__})")
    return [1.0 if v else 0.0 for v in value]
