"""TopK-SAE training on captured activations, single process or DDP under `torchrun`.

The SAE is trained on `x * s`, with the per-site scale `s = sqrt(d / E||x||^2)` (so that
`E||x s||^2 = d`), and comes out as a `TopKSAE` with `s` folded into its weights.

Objective per step, over the global batch `X` (all ranks together):

    L = ||X - X_hat||^2 / V(X)  +  aux_coef * ||E - E_hat||^2 / V(E)

where `V` is the total variance about the batch mean (so the first term is the fraction of
variance unexplained, FVU), `E = X - X_hat` (detached) and `E_hat` decodes, without `b_dec`,
the `aux_k` largest pre-activations among *dead* latents (no activation in the last
`dead_after_tokens` tokens): the AuxK loss, which gives dead latents a gradient toward the
residual. Decoder rows stay at unit norm: the gradient's component along each row is removed
before the Adam step and the rows are renormalised after it.

DDP: every rank holds the same data; step t draws one global batch (a slice of a seeded
permutation per epoch) and each rank takes its contiguous `batch_size / world_size` part. The
variances and firing counts are all-reduced, and each rank's loss is scaled so that DDP's
gradient average equals the single-process gradient of the global batch: two processes train
the same weights as one (up to float summation order).

Training checkpoint (`checkpoint_dir`), one pair per saved step, written tensors first, JSON last
(a JSON file is the commit mark)::

    step-00000100.safetensors   W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d] (scaled space),
                                adam.<name>.exp_avg, adam.<name>.exp_avg_sq, tokens_since_fired [F] int64
    step-00000100.json          {"format": "safedig-sae-train", "version": 1, "step": 100,
                                 "tensors": "step-00000100.safetensors", "sha256": "...",
                                 "adam_step": 100, "activation_scale": s, "d": d, "num_features": F,
                                 "config": {...TrainConfig...}, "data": {"num_tokens": N, "checksum": ...},
                                 "history": [...], "world_size": 2}
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from .._io import atomic_save_safetensors, atomic_write_json, dtype_from_name, read_json
from .._library import MAX_K
from ..reference import gather_sum
from ..sae import SAEMetadata, TopKSAE

CKPT_FORMAT = "safedig-sae-train"
CKPT_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d{8,})\.json$")
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Settings a resumed run may change; everything else in TrainConfig must match the checkpoint.
_RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "keep_checkpoints"}


@dataclass
class TrainConfig:
    """TopK-SAE training settings. `batch_size` is global (all ranks together).

    `num_features` None means `expansion * d`; `lr` None means `2e-4 / sqrt(F / 2**14)`;
    `aux_k` None means `min(d // 2, F)` (at least 1).
    """

    num_features: Optional[int] = None
    expansion: int = 4
    k: int = 32
    steps: int = 1000
    batch_size: int = 4096
    lr: Optional[float] = None
    aux_k: Optional[int] = None
    aux_coef: float = 1.0 / 32
    dead_after_tokens: int = 10_000_000
    scale_tokens: int = 65536
    seed: int = 0
    dtype: str = "float32"
    log_every: int = 50
    checkpoint_every: int = 0
    keep_checkpoints: int = 2

    def check(self, names: Optional[dict[str, str]] = None) -> "TrainConfig":
        """Check every setting that does not depend on the data width `d`; returns `self`.

        Cheap, so a caller (the CLI) runs it before loading any data; `resolved(d)` runs it too.
        `names` maps field names to what the errors call them (e.g. `{"num_features":
        "--features"}`); fields not in it are named as they are.
        """
        def name(f: str) -> str:
            return (names or {}).get(f, f)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.num_features is not None and (not is_int(self.num_features) or self.num_features < 1):
            raise ValueError(f"{name('num_features')} must be a positive int, got {self.num_features!r}")
        if self.num_features is None and (not is_int(self.expansion) or self.expansion < 1):
            raise ValueError(f"{name('expansion')} must be a positive int, got {self.expansion!r}")
        if not is_int(self.k) or not 1 <= self.k <= MAX_K:
            raise ValueError(f"{name('k')} must be an int in [1, {MAX_K}], got {self.k!r}")
        if self.num_features is not None and self.k > self.num_features:
            raise ValueError(f"{name('k')} must be an int in [1, {name('num_features')} = {self.num_features}], "
                             f"got {self.k!r}")
        for f in ("steps", "batch_size", "scale_tokens", "dead_after_tokens"):
            v = getattr(self, f)
            if not is_int(v) or v < 1:
                raise ValueError(f"{name(f)} must be a positive int, got {v!r}")
        if not is_int(self.seed):
            raise ValueError(f"{name('seed')} must be an int, got {self.seed!r}")
        for f in ("aux_k", "log_every", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, f)
            if f == "aux_k" and v is None:
                continue
            if not is_int(v) or v < 0:
                raise ValueError(f"{name(f)} must be a non-negative int, got {v!r}")
        if self.lr is not None and not (_is_real(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{name('lr')} must be a finite number > 0, got {self.lr!r}")
        if not (_is_real(self.aux_coef) and math.isfinite(self.aux_coef) and self.aux_coef >= 0):
            raise ValueError(f"{name('aux_coef')} must be a finite number >= 0, got {self.aux_coef!r}")
        dtype_from_name(self.dtype, name("dtype"))
        return self

    def resolved(self, d: int) -> "TrainConfig":
        """The settings for data of width `d`, defaults filled in (all checked)."""
        self.check()
        c = dataclasses.replace(self)
        if c.num_features is None:
            c.num_features = c.expansion * d
        if not 1 <= c.k <= c.num_features:
            raise ValueError(f"k must be an int in [1, num_features = {c.num_features}], got {c.k!r}")
        if c.lr is None:
            c.lr = 2e-4 / math.sqrt(c.num_features / 2 ** 14)
        if c.aux_k is None:
            c.aux_k = max(1, min(d // 2, c.num_features))
        return c


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class TrainResult:
    sae: TopKSAE
    activation_scale: float
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: Optional[int] = None


class _TopKSAEModule(torch.nn.Module):
    """Trainable TopK SAE in the scaled space: `W_enc` `[d, F]`, `b_enc` `[F]`, `W_dec` `[F, d]`, `b_dec` `[d]`."""

    def __init__(self, d: int, F_: int, b_dec: torch.Tensor, seed: int, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W_dec = F.normalize(torch.randn(F_, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
        # Encoder starts as the decoder's transpose: each latent first reads its own direction.
        self.W_enc = torch.nn.Parameter(W_dec.t().clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(F_, dtype=dtype))
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_dec = torch.nn.Parameter(b_dec.to(dtype).clone())

    def forward(self, x: torch.Tensor, k: int, dead: Optional[torch.Tensor], k_aux: int):
        """x `[n, d]` -> (x_hat `[n, d]`, aux `[n, d]` or None, z `[n, k]`, idx `[n, k]`)."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        z = torch.relu(vals)
        x_hat = self.b_dec + gather_sum(idx, z, self.W_dec)
        aux = None
        if k_aux > 0 and dead is not None:
            avals, aidx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            aux = gather_sum(aidx, torch.relu(avals), self.W_dec)
        return x_hat, aux, z, idx


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _dist()[0] > 1:
        dist.all_reduce(t)
    return t


def _global_variance(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Total variance about the mean of the global batch (all ranks), float64, and its size."""
    with torch.no_grad():
        x64 = x.double()
        s = torch.cat([x64.sum(0), (x64 * x64).sum().reshape(1), torch.tensor([x.shape[0]], dtype=torch.float64,
                                                                                device=x.device)])
        s = _all_reduce(s)
        n = int(s[-1].item())
        mean = s[:-2] / max(n, 1)
        return (s[-2] - n * (mean * mean).sum()).clamp_min(1e-12), n


def data_checksum(x: torch.Tensor) -> float:
    """A cheap fingerprint of a data tensor (a strided sample's float64 sum), to catch a resume on other data."""
    step = max(1, x.shape[0] // 4096)
    return float(x[::step].double().sum())


def activation_scale(x: torch.Tensor, num_tokens: int = 65536, seed: int = 0) -> float:
    """`s = sqrt(d / mean ||x||^2)` over a seeded sample of `num_tokens` rows of `x` `[N, d]`."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(x.shape[0], generator=g)[:num_tokens]
    ms = float(x[rows].double().pow(2).sum(-1).mean())
    if not (ms > 0 and math.isfinite(ms)):
        raise ValueError(f"activations have mean squared norm {ms}; expected a positive finite value")
    return math.sqrt(x.shape[1] / ms)


class BatchOrder:
    """Global batch t: a slice of the permutation of its epoch (seeded by epoch), so any step
    can be reproduced without saved RNG state."""

    def __init__(self, n: int, batch: int, seed: int):
        if batch > n:
            raise ValueError(f"batch_size {batch} exceeds the number of training tokens {n}")
        self.n, self.batch, self.seed = n, batch, seed
        self.per_epoch = n // batch
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch:(i + 1) * self.batch]


def _ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_train_checkpoint(directory: Union[str, Path], step: int, model: _TopKSAEModule,
                          optimizer: torch.optim.Optimizer, tokens_since_fired: torch.Tensor,
                          info: dict[str, Any], keep: int = 2) -> Path:
    """Write `step-NNNNNNNN.safetensors` then its JSON (format in the module docstring);
    older pairs beyond the newest `keep` are removed. Returns the JSON path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(model, name).detach() for name in _PARAMS}
    adam_step = 0
    for name in _PARAMS:
        st = optimizer.state.get(getattr(model, name), {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"adam.{name}.{key}"] = st[key]
        if "step" in st:
            adam_step = int(float(st["step"]))
    tensors["tokens_since_fired"] = tokens_since_fired
    name = _ckpt_name(step)
    atomic_save_safetensors(d / f"{name}.safetensors", tensors)
    meta = dict(info, format=CKPT_FORMAT, version=CKPT_VERSION, step=step, tensors=f"{name}.safetensors",
                sha256=_sha256(d / f"{name}.safetensors"), adam_step=adam_step)
    atomic_write_json(d / f"{name}.json", meta)
    if keep > 0:
        steps = sorted(int(m.group(1)) for p in d.iterdir() if (m := _CKPT_RE.match(p.name)))
        for old in steps[:-keep]:
            for ext in (".json", ".safetensors"):
                (d / f"{_ckpt_name(old)}{ext}").unlink(missing_ok=True)
    return d / f"{name}.json"


def latest_train_checkpoint(directory: Union[str, Path]) -> Optional[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """(JSON info, tensors) of the newest complete, intact checkpoint in `directory`, or None.
    A damaged newer checkpoint is skipped with a warning, never deleted."""
    d = Path(directory)
    if not d.is_dir():
        return None
    cands = sorted(((int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))), reverse=True)
    for step, path in cands:
        try:
            info = read_json(path, "training checkpoint")
            if info.get("format") != CKPT_FORMAT or info.get("version") != CKPT_VERSION:
                raise ValueError(f"training checkpoint {path}: expected format {CKPT_FORMAT!r} version {CKPT_VERSION}")
            tpath = d / info["tensors"]
            if not tpath.is_file() or _sha256(tpath) != info["sha256"]:
                raise ValueError(f"training checkpoint {path}: its tensor file {tpath} is missing or does not "
                                 f"match the recorded sha256")
            return info, load_file(str(tpath))
        except (ValueError, KeyError, FileNotFoundError) as e:
            warnings.warn(f"skipping training checkpoint {path}: {e}")
    return None


def _restore(info: dict[str, Any], tensors: dict[str, torch.Tensor], model: _TopKSAEModule,
             optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        for name in _PARAMS:
            p = getattr(model, name)
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ValueError(f"training checkpoint: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"this run expects {tuple(p.shape)}")
            p.copy_(tensors[name])
    if info["adam_step"] > 0:
        sd = optimizer.state_dict()
        for i, name in enumerate(_PARAMS):
            p = getattr(model, name)
            sd["state"][i] = {"step": torch.tensor(float(info["adam_step"])),
                              "exp_avg": tensors[f"adam.{name}.exp_avg"].to(device, p.dtype),
                              "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(device, p.dtype)}
        optimizer.load_state_dict(sd)
    return tensors["tokens_since_fired"].to(device)


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, x: torch.Tensor, batch_tokens: int = 8192) -> dict[str, float]:
    """FVU, L0 (mean active latents per token) and the fraction of latents that never fire on
    `x` `[N, d]`, using the SAE's own encode/decode (so any folded scale is exercised)."""
    if x.dim() != 2 or x.shape[1] != sae.d:
        raise ValueError(f"x must be [N, d] with d = {sae.d}, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty; cannot evaluate an SAE on zero tokens")
    err = 0.0
    sum_x = torch.zeros(sae.d, dtype=torch.float64)
    sum_sq = 0.0
    active = 0
    fired = torch.zeros(sae.num_features, dtype=torch.bool)
    for xb in x.split(batch_tokens):
        xb = xb.to(sae.device, sae.dtype)
        vals, idx = sae.encode(xb)
        x_hat = sae.decode(vals, idx)
        err += float((xb.double() - x_hat.double()).pow(2).sum())
        sum_x += xb.double().sum(0).cpu()
        sum_sq += float(xb.double().pow(2).sum())
        on = vals > 0
        active += int(on.sum())
        fired[idx[on].long().cpu()] = True
    n = x.shape[0]
    var = sum_sq - float((sum_x * sum_x).sum()) / n
    return {"fvu": err / max(var, 1e-12), "l0": active / n, "dead_fraction": 1.0 - float(fired.float().mean()),
            "tokens": n}


def train_sae(data: torch.Tensor, config: TrainConfig, *, checkpoint_dir: Union[str, Path, None] = None,
              resume: bool = True, device: Union[str, torch.device, None] = None, progress: bool = True,
              metadata: Optional[SAEMetadata] = None) -> TrainResult:
    """Train a TopK SAE on `data` `[N, d]` (the same tensor on every rank under DDP).

    Resumes from the newest checkpoint in `checkpoint_dir` when `resume` (the settings and the
    data must match it; `steps` may grow). Only rank 0 writes. Returns the SAE (scale folded,
    dtype `config.dtype`) with its last metrics and the logged history.
    """
    from tqdm.auto import tqdm

    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.shape[0] == 0 or not data.is_floating_point():
        raise ValueError(f"data must be a non-empty floating tensor [N, d], got "
                         f"{getattr(data, 'shape', type(data).__name__)}")
    N, d = data.shape
    cfg = config.resolved(d)
    world, rank = _dist()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {world}")
    dtype = dtype_from_name(cfg.dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    batches = BatchOrder(N, cfg.batch_size, cfg.seed)

    scale = activation_scale(data, cfg.scale_tokens, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    sample = data[torch.randperm(N, generator=g)[:cfg.scale_tokens]].double() * scale
    model = _TopKSAEModule(d, cfg.num_features, sample.mean(0), cfg.seed, dtype).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    tokens_since_fired = torch.zeros(cfg.num_features, dtype=torch.int64, device=device)
    history: list[dict[str, float]] = []
    start = 0
    data_info = {"num_tokens": N, "d": d, "checksum": data_checksum(data)}
    resumed_from = None
    if checkpoint_dir is not None and resume:
        found = latest_train_checkpoint(checkpoint_dir)
        if found is not None:
            info, tensors = found
            saved = info["config"]
            diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                    if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
            if diff:
                raise ValueError(f"checkpoint {checkpoint_dir}/{_ckpt_name(info['step'])}.json was made with other "
                                 f"settings (saved vs now: {diff}); use them, or another --checkpoint-dir")
            if info["data"] != data_info:
                raise ValueError(f"checkpoint {checkpoint_dir} was trained on other data ({info['data']} vs "
                                 f"{data_info}); resume on the same activations or use another --checkpoint-dir")
            scale = float(info["activation_scale"])
            tokens_since_fired = _restore(info, tensors, model, optimizer, device)
            start = resumed_from = int(info["step"])
            history = list(info.get("history", []))

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    local = cfg.batch_size // world
    metrics: dict[str, float] = dict(history[-1]) if history else {}
    info_base = {"config": dataclasses.asdict(cfg), "activation_scale": scale, "d": d,
                 "num_features": cfg.num_features, "data": data_info, "world_size": world}

    bar = tqdm(range(start, cfg.steps), desc="train SAE", unit="step", disable=not progress or rank != 0,
               initial=start, total=cfg.steps)
    for step in bar:
        rows = batches(step)[rank * local:(rank + 1) * local]
        x = data[rows].to(device=device, dtype=dtype) * scale
        dead = tokens_since_fired >= cfg.dead_after_tokens
        n_dead = int(dead.sum())
        k_aux = min(cfg.aux_k, n_dead) if cfg.aux_coef > 0 else 0
        x_hat, aux, z, idx = ddp(x, cfg.k, dead, k_aux)
        var_x, n_glob = _global_variance(x)
        err = (x - x_hat).pow(2).sum()
        loss = err * world / var_x.to(dtype)
        aux_loss = torch.zeros((), dtype=dtype, device=device)
        if aux is not None:
            e = (x - x_hat).detach()
            var_e, _ = _global_variance(e)
            aux_loss = cfg.aux_coef * (e - aux).pow(2).sum() * world / var_e.to(dtype)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_loss).backward()
        with torch.no_grad():
            # Keep rows at unit norm: drop the gradient component that would only change a row's length.
            W, gW = model.W_dec, model.W_dec.grad
            gW -= (gW * W).sum(1, keepdim=True) * W
        optimizer.step()
        with torch.no_grad():
            model.W_dec.div_(model.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            on = z > 0
            counts = torch.zeros(cfg.num_features, dtype=torch.float64, device=device)
            counts.index_add_(0, idx[on], torch.ones(int(on.sum()), dtype=torch.float64, device=device))
            stats = torch.cat([counts, torch.stack([err.detach().double(), on.sum().double(),
                                                    aux_loss.detach().double() / world])])
            stats = _all_reduce(stats)
            tokens_since_fired += n_glob
            tokens_since_fired[stats[:-3] > 0] = 0
        metrics = {"step": step + 1, "fvu": float(stats[-3] / var_x), "l0": float(stats[-2]) / n_glob,
                   "aux_loss": float(stats[-1]),
                   "dead_fraction": float((tokens_since_fired >= cfg.dead_after_tokens).double().mean())}
        metrics["loss"] = metrics["fvu"] + metrics["aux_loss"]
        last = step + 1 == cfg.steps
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or last):
            history.append(metrics)
            bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}",
                            dead=f"{metrics['dead_fraction']:.2f}")
        save_now = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        if checkpoint_dir is not None and (save_now or last) and rank == 0:
            save_train_checkpoint(checkpoint_dir, step + 1, model, optimizer, tokens_since_fired,
                                  dict(info_base, history=history), keep=cfg.keep_checkpoints)
    bar.close()
    if world > 1:
        dist.barrier()

    meta = dataclasses.replace(metadata) if metadata is not None else SAEMetadata()
    meta.extra = dict(meta.extra, train={"steps": cfg.steps, "tokens": N, "k": cfg.k, "final": metrics})
    with torch.no_grad():
        sae = TopKSAE(*(getattr(model, n).detach().cpu() for n in _PARAMS), k=cfg.k, metadata=meta,
                      activation_scale=scale)
    return TrainResult(sae=sae, activation_scale=scale, metrics=metrics, history=history, resumed_from=resumed_from)
