"""Reading what the sites recorded (`state.py`): per rank, or over the whole sequence of a
context-parallel transformer.

Under diffusers' context parallelism (`ModelMixin.enable_parallelism` with a
`ContextParallelConfig`), the model's `_cp_plan` splits the sequence at the transformer's input
and gathers it at `proj_out`, so every block between them, and every site on it, sees only its
rank's tokens, and each rank's buffers hold statistics of its own tokens. Every telemetry row
also holds the counts its statistics are over (`tokens`, `finite_tokens`), so the statistics of
the whole sequence are count-weighted sums over the ranks: at read time, one all-reduce of one
float64 tensor over every site's rows, never anything per step. A site that sees the whole
sequence on every rank (a text encoder, a block outside the split) is weighted against copies of
itself, which leaves its values as they are. Settings and counters that do not depend on tokens
(written, progress, active) are the same on every rank and are read locally.

Every rank of the group must read (the all-reduce is a collective), with the same sites and
the same number of requests; `scope="rank"` reads one rank's own tokens and communicates nothing.
"""
from __future__ import annotations

import warnings

import torch

from .state import REQUEST_TELEMETRY_ROWS, TELEMETRY_COLUMNS, SiteSteering, SteeringState

__all__ = ["SCOPES", "context_parallel_group", "telemetry_group", "written_rows"]

SCOPES = ("sequence", "rank")
_SUMMED = ("gated_fraction", "mean_harm", "tokens", "finite_tokens")


def context_parallel_group(model: torch.nn.Module):
    """The process group a diffusers model splits its sequence over (`enable_parallelism` with a
    `ContextParallelConfig`), or None when it runs whole on each process."""
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None:
        return None
    mesh = getattr(cp, "_flattened_mesh", None)  # set by ContextParallelConfig.setup (diffusers 0.42.1)
    if mesh is None:
        raise RuntimeError(f"SafeDIG telemetry: {type(model).__name__} has a context-parallel config without its "
                           f"device mesh, so the ranks to sum over are unknown; pass telemetry(group=...) or read "
                           f"telemetry(scope='rank')")
    return mesh.get_group() if mesh.size() > 1 else None


def telemetry_group(model: torch.nn.Module, scope: str, group, where: str):
    """The group to sum a read over: None for one rank's own tokens."""
    if scope not in SCOPES:
        raise ValueError(f"{where}(scope=...): expected one of {SCOPES}, got {scope!r}")
    if scope == "rank":
        if group is not None:
            raise ValueError(f"{where}: group= sums over ranks, scope='rank' reads this rank alone; give one of them")
        return None
    if group is None:
        return context_parallel_group(model)
    if not isinstance(group, torch.distributed.ProcessGroup):
        raise TypeError(f"{where}(group=...): expected a torch.distributed.ProcessGroup (the ranks the sequence is "
                        f"split over), got {type(group).__name__}")
    return group if torch.distributed.get_world_size(group) > 1 else None


def written_rows(sites: dict[str, tuple[SteeringState, SiteSteering]], requests: bool,
                 group) -> dict[str, list[tuple[int, list, float]]]:
    """Per site: (step, row, progress) of each row of its telemetry buffer (per call, or per
    request: `requests`) written by a call since the last reset; a row is a list of the
    buffer's entries (`TELEMETRY_COLUMNS`, or `REQUEST_TELEMETRY_ROWS` by requests). `group`:
    sum over those ranks (module docstring), or None."""
    heads, calls = {}, {}
    for key, (state, st) in sites.items():
        if st.telemetry is None:
            raise RuntimeError("telemetry is off (SafeDIGConfig.telemetry=False)")
        buffer = st.request_telemetry if requests else st.telemetry
        calls[key] = int(state.clock.counter)
        cap = buffer.shape[0]
        if not requests and calls[key] > cap:
            warnings.warn(f"SafeDIG telemetry for {key!r}: {calls[key]} calls but room for {cap}; the last row "
                          f"holds the latest call. Raise telemetry_capacity or call reset_telemetry() more often.")
        heads[key] = (buffer[: min(calls[key], cap)], st.telemetry[: min(calls[key], cap), 1])
    names = REQUEST_TELEMETRY_ROWS if requests else TELEMETRY_COLUMNS
    rows = {key: head for key, (head, _) in heads.items()}
    host = _summed(rows, names, group) if group is not None else {key: h.cpu() for key, h in rows.items()}
    out = {}
    for key, head in host.items():
        if head.shape[-1] == 0:  # no requests set for this number of them
            out[key] = []
            continue
        cap = sites[key][1].telemetry.shape[0]
        progress = heads[key][1].tolist()
        # the first entry, "written", is 0 where the site did not run in that call (e.g. skip_layers)
        written = (head.flatten(1)[:, 0] == 1.0).tolist()
        out[key] = [(i if i < cap - 1 else calls[key] - 1, row, progress[i])
                    for i, (row, w) in enumerate(zip(head.tolist(), written)) if w]
    return out


def _summed(rows: dict[str, torch.Tensor], names: tuple[str, ...], group) -> dict[str, torch.Tensor]:
    """Host copies of `rows` (`[calls, len(names), ...]` each) whose fractions and means are over
    every rank's tokens: one all-reduce, in float64, on the device of the first buffer."""
    index = [names.index(name) for name in _SUMMED]
    device = next(iter(rows.values())).device
    parts = []
    for head in rows.values():
        gated, mean_h, tokens, finite = head.to(device, torch.float64)[:, index].unbind(1)
        # The counts are exact in fp32 below 2**24 tokens per rank, so round() recovers the count
        # of gated tokens that the fp32 fraction was made of.
        parts.append(torch.stack([(gated * tokens).round(), mean_h * finite, tokens, finite], 1))
    flat = torch.cat([p.flatten() for p in parts])
    if flat.numel():  # the same on every rank (same sites, same requests), so all skip together
        torch.distributed.all_reduce(flat, group=group)
    out, start = {}, 0
    for (key, head), part in zip(rows.items(), parts):
        gated, mean_h, tokens, finite = flat[start: start + part.numel()].view_as(part).unbind(1)
        start += part.numel()
        whole = head.to("cpu", torch.float64, copy=True)
        whole[:, index] = torch.stack([gated / tokens.clamp_min(1), mean_h / finite.clamp_min(1), tokens,
                                       finite], 1).cpu()
        out[key] = whole.to(torch.float32)
    return out
