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
permutation per epoch) and each rank takes its contiguous `batch_size / num_ranks` part. The
variances and firing counts are all-reduced, and each rank's loss is scaled so that DDP's
gradient average equals the single-process gradient of the global batch: two processes train
the same weights as one (up to float summation order).

Streaming (data larger than memory): `training_data(store, site, config)` returns the tensor as
before when `config.memory_budget_mb` is None or the selection fits in it, and otherwise this
process's `ActivationStream` (its share of the entries under DDP). `train_sae` trains from a
stream through a shuffle buffer (`StreamBatches`) sized by `stream_buffer_tokens`: the budget
(per process) less an estimate of the SAE's own training memory (`sae_training_bytes`: weights,
Adam state, one step's work), reading and a reserve, so the process's peak memory follows the
budget, not the store's size. What the in-memory path computes over the whole tensor, the
stream computes thus:

- activation scale and the initial `b_dec`: exact mean squared norm and mean over every token
  of the stream, in one pass before training (each process its share, all-reduced). The pass
  also verifies every tensor's checksum before the first step. A resumed run skips it (both
  come from the checkpoint); the in-memory path keeps its seeded `scale_tokens` sample.
- FVU: the loss's variance is the global batch's, as in memory; `evaluate_sae(sae, stream)`
  sums over a pass (all-reduced under DDP).
- data fingerprint for resume: `ActivationStream.fingerprint()`, a CRC32 of the manifest
  records (recorded checksums, shapes, rows kept), so a resume reads nothing to check it; the
  checkpoint also records the number of ranks and the buffer size, which the batch order depends on.
- batch order: a pure function of (seed, rank, number of ranks, buffer size, step), so resuming
  needs no saved RNG state and reads only the block the next step needs.

What the buffer loses against a global shuffle: a batch mixes only the tokens of one block
(about `buffer_tokens` consecutive tokens of an epoch's random entry order), not of the whole
store, so tokens of one entry (one prompt, site and step) tend to share the batches of a block,
and the blocks of an epoch are visited one after the other. Every token is still used once per
epoch. The weights are deterministic for a seed, budget and number of ranks, but differ from the
in-memory run and, under DDP, from the single-process streaming run: each process shuffles
only its own share, so the global batches differ (the in-memory path still matches bit for bit).

Training checkpoint (`checkpoint_dir`), one pair per saved step, written tensors first, JSON last
(a JSON file is the commit mark)::

    step-00000100.safetensors   W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d] (scaled space),
                                adam.<name>.exp_avg, adam.<name>.exp_avg_sq, tokens_since_fired [F] int64
    step-00000100.json          {"format": "safedig-sae-train", "version": 1, "step": 100,
                                 "tensors": "step-00000100.safetensors", "sha256": "...",
                                 "adam_step": 100, "activation_scale": s, "d": d, "num_features": F,
                                 "config": {...TrainConfig...}, "data": {"num_tokens": N, "checksum": ...},
                                 "history": [...], "num_ranks": 2}
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file

from .._io import atomic_save_safetensors, atomic_write_json, dtype_from_name, read_json
from .._library import MAX_K
from ..integrations.diffusers.sites import SiteSpec
from ..reference import gather_sum
from ..sae import SAEMetadata, TopKSAE
from .prompts import LabelSelector
from .store import ActivationStore, ActivationStream

logger = logging.getLogger(__name__)

CKPT_FORMAT = "safedig-sae-train"
CKPT_VERSION = 1
_CKPT_RE = re.compile(r"^step-(\d{8,})\.json$")
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Settings a resumed run may change; everything else in TrainConfig must match the checkpoint.
# memory_budget_mb changes nothing in memory; for a stream its buffer size is checked with the data record.
_RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "keep_checkpoints", "memory_budget_mb"}
MiB = 1 << 20


@dataclass
class TrainConfig:
    """TopK-SAE training settings. `batch_size` is global (all ranks together).

    `num_features` None means `expansion * d`; `lr` None means `2e-4 / sqrt(F / 2**14)`;
    `aux_k` None means `min(d // 2, F)` (at least 1). `memory_budget_mb` (MiB, per process)
    bounds what training from a store (`training_data`) holds, activations and the SAE's
    training together: None loads the whole selection as before; a tensor given to
    `train_sae` is already in memory and ignores it.
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
    memory_budget_mb: Optional[int] = None

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
        if self.memory_budget_mb is not None and (not is_int(self.memory_budget_mb) or self.memory_budget_mb < 1):
            raise ValueError(f"{name('memory_budget_mb')} must be a positive int (MiB), got {self.memory_budget_mb!r}")
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
    data: dict[str, Any] = field(default_factory=dict)  # num_tokens, d, checksum; "stream" when streamed


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


def _ranks() -> tuple[int, int]:
    """(number of ranks, this process's rank) under torch.distributed; (1, 0) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _ranks()[0] > 1:
        dist.all_reduce(t)
    return t


def _all_reduce_host(t: torch.Tensor) -> torch.Tensor:
    """`_all_reduce` of a CPU tensor in place; NCCL reduces only CUDA tensors, so it goes through the GPU."""
    if _ranks()[0] > 1 and dist.get_backend() == "nccl":
        t.copy_(_all_reduce(t.to(torch.device("cuda", torch.cuda.current_device()))).cpu())
        return t
    return _all_reduce(t)


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


def _generator(*parts: Any) -> torch.Generator:
    """A generator seeded from `parts` (hashed, so nearby seeds, ranks or epochs do not collide)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def in_memory_bytes(num_tokens: int, d: int, scale_tokens: int) -> int:
    """What training on a float32 `[num_tokens, d]` tensor holds besides the model: the tensor, and
    the float64 samples the activation scale and the initial `b_dec` are computed from."""
    return num_tokens * d * 4 + min(num_tokens, scale_tokens) * d * 20


def sae_training_bytes(d: int, num_features: int, local_batch: int, itemsize: int) -> int:
    """Rough memory of training the SAE itself, which does not grow with the data: the weights with
    their gradients and two Adam moments, and one step's work (the `[batch, F]` pre-activations,
    their gradient, the top-k and AuxK temporaries; several `[batch, d]` copies of the batch).
    Calibrated on CPU peak RSS: it covers what training adds for d = 256, F up to 2048, batches
    up to 4096 tokens."""
    return (4 * (2 * d * num_features + num_features + d) + 6 * local_batch * num_features
            + 12 * local_batch * d) * itemsize


def stream_buffer_tokens(stream: ActivationStream, config: TrainConfig, local_batch: int) -> int:
    """Rows of the shuffle buffer that `config.memory_budget_mb` MiB allow for `stream`: the budget,
    less a sixteenth kept for the allocator's slack and Python's objects, the SAE's own training
    (`sae_training_bytes`), reading (two tensors in flight, each as stored plus float32 and
    float64 copies) and forming a batch (up to two float32 parts), divided by a float32 row plus
    its int64 slot in the block's permutation. At most the stream's token count (the same on
    every process). `config` must be `resolved`."""
    d, mb = stream.d, config.memory_budget_mb
    sae = sae_training_bytes(d, config.num_features, local_batch, dtype_from_name(config.dtype).itemsize)
    reading = 2 * (stream.max_read_bytes + stream.max_read_rows * d * 12)
    batch = 2 * local_batch * d * 4
    tokens = (mb * MiB - mb * MiB // 16 - sae - reading - batch) // (d * 4 + 8)
    if tokens < local_batch:
        need = math.ceil((sae + reading + batch + local_batch * (d * 4 + 8)) * 16 / 15 / MiB)
        raise ValueError(f"memory_budget_mb (--memory-mb) = {mb} is too small: the SAE (d={d}, F={config.num_features}"
                         f") with its Adam state and one step of {local_batch} tokens per process take about "
                         f"{sae / MiB:.1f} MiB, reading the largest tensor ({stream.max_read_rows} x {d}) and forming "
                         f"a batch {(reading + batch) / MiB:.1f} MiB, leaving room for {max(tokens, 0)} buffered "
                         f"tokens, fewer than one batch; expected at least {need}")
    return int(min(tokens, stream.total_tokens))


class StreamBatches:
    """One process's batches from its share of an `ActivationStream`, through a shuffle buffer.

    Epoch e (every `n // local_batch` steps, n the share's tokens) lays the share's entries end to
    end in a seeded random order and cuts that sequence into blocks of `buffer_tokens` tokens.
    A block is read into the buffer one tensor at a time, its rows get a seeded permutation, and
    batches are consecutive slices of the permuted blocks (a batch may end in the next block).
    Step t's batch depends only on (seed, rank, buffer_tokens, t), as `BatchOrder`'s does, so a
    resumed run reads just the block it needs. When the share fits in one block it is read once
    and each epoch is a full shuffle of it.
    """

    def __init__(self, stream: ActivationStream, local_batch: int, buffer_tokens: int, seed: int):
        self.stream, self.local, self.seed = stream, local_batch, seed
        self.n = stream.num_tokens
        small = min(range(stream.num_ranks), key=lambda r: stream.share_tokens[r])
        if local_batch > stream.share_tokens[small]:  # checked for every share, so every process stops here
            raise ValueError(f"process {small} of {stream.num_ranks} holds {stream.share_tokens[small]} tokens of "
                             f"the stream, fewer than its part of a batch ({local_batch} = batch_size / processes); "
                             f"lower batch_size or use fewer processes")
        if buffer_tokens < local_batch:
            raise ValueError(f"buffer_tokens must be >= the batch part {local_batch}, got {buffer_tokens}")
        self.per_epoch = self.n // local_batch
        self.B = buffer_tokens
        self.blocks = -(-self.n // buffer_tokens)
        self.buf = torch.empty(min(buffer_tokens, self.n), stream.d, dtype=torch.float32)
        self.tensors_read = 0  # how often a tensor was read: the cost of refilling
        self._block: Optional[tuple[int, int]] = None
        self._perm = torch.empty(0, dtype=torch.int64)
        self._order_epoch: Optional[int] = None
        self._order: list = []
        self._starts = torch.empty(0, dtype=torch.int64)

    def _epoch_order(self, epoch: int) -> None:
        if self._order_epoch == epoch:
            return
        es = self.stream.entries
        if self.blocks > 1:
            es = [es[i] for i in torch.randperm(len(es), generator=_generator(self.seed, self.stream.rank,
                                                                                epoch, "entries")).tolist()]
        rows = torch.tensor([self.stream.rows(e) for e in es], dtype=torch.int64)
        self._order, self._starts, self._order_epoch = es, rows.cumsum(0) - rows, epoch

    def _load(self, epoch: int, j: int) -> None:
        if self._block == (epoch, j):
            return
        lo, hi = j * self.B, min((j + 1) * self.B, self.n)
        if not (self.blocks == 1 and self._block is not None):  # a lone block keeps its layout: no reread
            self._epoch_order(epoch)
            first = int(torch.searchsorted(self._starts, lo, right=True)) - 1
            last = int(torch.searchsorted(self._starts, hi))
            start = {(e.shard, e.key): int(self._starts[i]) for i, e in enumerate(self._order[first:last], first)}
            todo = sorted((e for e in self._order[first:last] if self.stream.rows(e) > 0),
                          key=lambda e: (e.shard, e.key))  # file order: fewer opens, same result
            for e, t in self.stream.read_many(todo):
                s = start[(e.shard, e.key)]
                a, b = max(lo, s), min(hi, s + t.shape[0])
                self.buf[a - lo:b - lo].copy_(t[a - s:b - s])
                self.tensors_read += 1
                del t  # drop it before the next read
            logger.debug("rank %d: epoch %d block %d/%d read (%d tokens)", self.stream.rank, epoch, j + 1,
                         self.blocks, hi - lo)
        self._perm = torch.randperm(hi - lo, generator=_generator(self.seed, self.stream.rank, epoch, j, "rows"))
        self._block = (epoch, j)

    def __call__(self, step: int) -> torch.Tensor:
        """This process's rows of global batch `step`: float32 `[local_batch, d]`."""
        epoch, i = divmod(step, self.per_epoch)
        a, b = i * self.local, (i + 1) * self.local
        parts = []
        while a < b:
            j = a // self.B
            end = min(b, (j + 1) * self.B)
            self._load(epoch, j)
            parts.append(self.buf[self._perm[a - j * self.B:end - j * self.B]])
            a = end
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stream_moments(stream: ActivationStream) -> tuple[float, torch.Tensor]:
    """(activation scale, mean `[d]` float64) over every token of the stream, all processes together."""
    d = stream.d
    sums = torch.zeros(d + 2, dtype=torch.float64)
    for _, t in stream.read_many(stream.entries):
        t64 = t.double()
        del t
        sums[:d] += t64.sum(0)
        sums[d] += torch.dot(t64.view(-1), t64.view(-1))  # no squared copy
        sums[d + 1] += t64.shape[0]
        del t64
    _all_reduce_host(sums)
    n = float(sums[d + 1])
    ms = float(sums[d]) / max(n, 1.0)
    if not (ms > 0 and math.isfinite(ms)):
        raise ValueError(f"activations have mean squared norm {ms}; expected a positive finite value")
    return math.sqrt(d / ms), sums[:d] / n


def training_data(store: ActivationStore, site: Union[str, SiteSpec], config: TrainConfig, *,
                  labels: LabelSelector = None, steps: Optional[Iterable[int]] = None,
                  max_tokens: Optional[int] = None) -> Union[torch.Tensor, ActivationStream]:
    """What `train_sae` should train on from `store` (`config.seed` also seeds `max_tokens`' subsample).

    The whole selection as one float32 tensor, loaded by every process as before, when
    `config.memory_budget_mb` is None or the tensor, the samples training draws from it
    (`in_memory_bytes`) and the SAE's training (`sae_training_bytes`) fit in it; otherwise this
    process's `ActivationStream` (its share under torch.distributed), for `train_sae` to stream
    through a shuffle buffer within the budget. Reads no activations to decide: the sizes come
    from the manifest.
    """
    config.check()
    num_ranks, rank = _ranks()
    steps = None if steps is None else list(steps)
    stream = store.stream(site, labels=labels, steps=steps, max_tokens=max_tokens, seed=config.seed, rank=rank,
                          num_ranks=num_ranks)
    cfg = config.resolved(stream.d)
    item = dtype_from_name(cfg.dtype).itemsize
    need = (in_memory_bytes(stream.total_tokens, stream.d, cfg.scale_tokens)
            + sae_training_bytes(stream.d, cfg.num_features, cfg.batch_size // num_ranks, item))
    if config.memory_budget_mb is None or need <= config.memory_budget_mb * MiB:
        return store.load(site, labels=labels, steps=steps, max_tokens=max_tokens, seed=config.seed)
    logger.info("%s: %d tokens x d=%d need %.1f MiB in memory, more than memory_budget_mb=%d: streaming; this "
                "process reads its share, %d tokens in %d entries", stream.site_key, stream.total_tokens, stream.d,
                need / MiB, config.memory_budget_mb, stream.num_tokens, len(stream.entries))
    return stream


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


# Checkpoints written before the DDP side was named by its ranks (the word "world" is the demo's:
# workflow/world.py) record "world_size" where they now record "num_ranks". A checkpoint on disk is
# data, so it still resumes.
def _checkpoint_as_read(info: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint's JSON info in today's keys."""
    stream = info.get("data", {}).get("stream") if isinstance(info.get("data"), dict) else None
    for doc in (info, stream):
        if isinstance(doc, dict) and "world_size" in doc and "num_ranks" not in doc:
            doc["num_ranks"] = doc.pop("world_size")
    return info


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
            return _checkpoint_as_read(info), load_file(str(tpath))
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


class _EvalSums:
    """What `evaluate_sae` adds up over batches of tokens."""

    def __init__(self, sae: TopKSAE):
        self.sae = sae
        self.err, self.sum_sq, self.active, self.n = 0.0, 0.0, 0, 0
        self.sum_x = torch.zeros(sae.d, dtype=torch.float64)
        self.fired = torch.zeros(sae.num_features, dtype=torch.bool)

    def add(self, xb: torch.Tensor) -> None:
        sae = self.sae
        xb = xb.to(sae.device, sae.dtype)
        vals, idx = sae.encode(xb)
        x_hat = sae.decode(vals, idx)
        self.err += float((xb.double() - x_hat.double()).pow(2).sum())
        self.sum_x += xb.double().sum(0).cpu()
        self.sum_sq += float(xb.double().pow(2).sum())
        on = vals > 0
        self.active += int(on.sum())
        self.fired[idx[on].long().cpu()] = True
        self.n += xb.shape[0]

    def all_reduce(self) -> None:
        packed = torch.cat([torch.tensor([self.err, self.sum_sq, self.active, self.n], dtype=torch.float64),
                            self.sum_x, self.fired.double()])
        _all_reduce_host(packed)
        self.err, self.sum_sq, self.active, self.n = (float(v) for v in packed[:4])
        self.sum_x, self.fired = packed[4:4 + self.sae.d], packed[4 + self.sae.d:] > 0

    def result(self) -> dict[str, float]:
        n = self.n
        var = self.sum_sq - float((self.sum_x * self.sum_x).sum()) / n
        return {"fvu": self.err / max(var, 1e-12), "l0": self.active / n,
                "dead_fraction": 1.0 - float(self.fired.float().mean()), "tokens": int(n)}


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, x: Union[torch.Tensor, ActivationStream], batch_tokens: int = 8192) -> dict[str, float]:
    """FVU, L0 (mean active latents per token) and the fraction of latents that never fire on
    `x` `[N, d]`, using the SAE's own encode/decode (so any folded scale is exercised).

    `x` may be an `ActivationStream`: one pass over it, one tensor at a time; a share of a
    stream split over processes is evaluated by every process together (all-reduced), so call
    it on every rank."""
    if isinstance(x, ActivationStream):
        if x.d != sae.d:
            raise ValueError(f"the stream has width d = {x.d}, the SAE d = {sae.d}")
        num_ranks, rank = _ranks()
        if (x.rank, x.num_ranks) != (rank, num_ranks):
            raise ValueError(f"the stream is share {x.rank} of {x.num_ranks}, but this is process {rank} of "
                             f"{num_ranks}: make it with rank={rank}, num_ranks={num_ranks}")
        sums = _EvalSums(sae)
        for _, t in x.read_many(x.entries):
            for xb in t.split(batch_tokens):
                sums.add(xb)
            del t
        if num_ranks > 1:
            sums.all_reduce()
        if sums.n == 0:
            raise ValueError("the stream is empty; cannot evaluate an SAE on zero tokens")
        return sums.result()
    if x.dim() != 2 or x.shape[1] != sae.d:
        raise ValueError(f"x must be [N, d] with d = {sae.d}, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty; cannot evaluate an SAE on zero tokens")
    sums = _EvalSums(sae)
    for xb in x.split(batch_tokens):
        sums.add(xb)
    return sums.result()


def train_sae(data: Union[torch.Tensor, ActivationStream], config: TrainConfig, *,
              checkpoint_dir: Union[str, Path, None] = None, resume: bool = True,
              device: Union[str, torch.device, None] = None, progress: bool = True,
              metadata: Optional[SAEMetadata] = None) -> TrainResult:
    """Train a TopK SAE on `data`: a tensor `[N, d]` (the same tensor on every rank under DDP), or
    an `ActivationStream` (each rank its own share, see `training_data`), streamed through a
    shuffle buffer within `config.memory_budget_mb` (the module docstring says what changes).

    Resumes from the newest checkpoint in `checkpoint_dir` when `resume` (the settings and the
    data must match it; `steps` may grow). Only rank 0 writes. Returns the SAE (scale folded,
    dtype `config.dtype`) with its last metrics and the logged history.
    """
    from tqdm.auto import tqdm

    streaming = isinstance(data, ActivationStream)
    if streaming:
        N, d = data.total_tokens, data.d
    elif not isinstance(data, torch.Tensor) or data.dim() != 2 or data.shape[0] == 0 or not data.is_floating_point():
        raise ValueError(f"data must be a non-empty floating tensor [N, d] or an ActivationStream, got "
                         f"{getattr(data, 'shape', type(data).__name__)}")
    else:
        N, d = data.shape
    cfg = config.resolved(d)
    num_ranks, rank = _ranks()
    if cfg.batch_size % num_ranks:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of ranks {num_ranks}")
    dtype = dtype_from_name(cfg.dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    local = cfg.batch_size // num_ranks
    if streaming:
        if (data.rank, data.num_ranks) != (rank, num_ranks):
            raise ValueError(f"data is share {data.rank} of {data.num_ranks} of a stream, but this is process "
                             f"{rank} of {num_ranks}: make it with rank={rank}, num_ranks={num_ranks} "
                             f"(training_data does)")
        if cfg.memory_budget_mb is None:
            raise ValueError("memory_budget_mb must be set to train from an ActivationStream: it sizes the shuffle "
                             "buffer (training_data returns a stream only when it is set)")
        if cfg.batch_size > N:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the number of training tokens {N}")
        buffer_tokens = stream_buffer_tokens(data, cfg, local)
        batches = StreamBatches(data, local, buffer_tokens, cfg.seed)
        data_info = {"num_tokens": N, "d": d, "checksum": data.fingerprint(),
                     "stream": {"num_ranks": num_ranks, "buffer_tokens": buffer_tokens}}
        logger.info("rank %d: streaming %d of %d tokens through a buffer of %d tokens (%.1f MiB, %d block(s) per "
                    "epoch) within memory_budget_mb=%d, of which the SAE's training takes about %.1f MiB", rank,
                    data.num_tokens, N, batches.buf.shape[0], batches.buf.numel() * 4 / MiB, batches.blocks,
                    cfg.memory_budget_mb, sae_training_bytes(d, cfg.num_features, local, dtype.itemsize) / MiB)
    else:
        batches = BatchOrder(N, cfg.batch_size, cfg.seed)
        data_info = {"num_tokens": N, "d": d, "checksum": data_checksum(data)}

    found = latest_train_checkpoint(checkpoint_dir) if checkpoint_dir is not None and resume else None
    if found is not None:
        _check_resumable(found[0], cfg, data_info, checkpoint_dir)
    if not streaming:
        scale = activation_scale(data, cfg.scale_tokens, cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        b_dec0 = (data[torch.randperm(N, generator=g)[:cfg.scale_tokens]].double() * scale).mean(0)
    elif found is None:
        logger.info("rank %d: one pass over %d tokens for the activation scale and mean (checksums verified)",
                    rank, data.num_tokens)
        scale, mean = _stream_moments(data)
        b_dec0 = mean * scale
    else:
        scale, b_dec0 = float("nan"), torch.zeros(d, dtype=torch.float64)  # both come from the checkpoint
    model = _TopKSAEModule(d, cfg.num_features, b_dec0, cfg.seed, dtype).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    tokens_since_fired = torch.zeros(cfg.num_features, dtype=torch.int64, device=device)
    history: list[dict[str, float]] = []
    start = 0
    resumed_from = None
    if found is not None:
        info, tensors = found
        scale = float(info["activation_scale"])
        tokens_since_fired = _restore(info, tensors, model, optimizer, device)
        start = resumed_from = int(info["step"])
        history = list(info.get("history", []))

    ddp = model
    if num_ranks > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics: dict[str, float] = dict(history[-1]) if history else {}
    info_base = {"config": dataclasses.asdict(cfg), "activation_scale": scale, "d": d,
                 "num_features": cfg.num_features, "data": data_info, "num_ranks": num_ranks}

    bar = tqdm(range(start, cfg.steps), desc="train SAE", unit="step", disable=not progress or rank != 0,
               initial=start, total=cfg.steps)
    for step in bar:
        xb = batches(step) if streaming else data[batches(step)[rank * local:(rank + 1) * local]]
        x = xb.to(device=device, dtype=dtype) * scale
        dead = tokens_since_fired >= cfg.dead_after_tokens
        n_dead = int(dead.sum())
        k_aux = min(cfg.aux_k, n_dead) if cfg.aux_coef > 0 else 0
        x_hat, aux, z, idx = ddp(x, cfg.k, dead, k_aux)
        var_x, n_glob = _global_variance(x)
        err = (x - x_hat).pow(2).sum()
        loss = err * num_ranks / var_x.to(dtype)
        aux_loss = torch.zeros((), dtype=dtype, device=device)
        if aux is not None:
            e = (x - x_hat).detach()
            var_e, _ = _global_variance(e)
            aux_loss = cfg.aux_coef * (e - aux).pow(2).sum() * num_ranks / var_e.to(dtype)
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
                                                    aux_loss.detach().double() / num_ranks])])
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
    if num_ranks > 1:
        dist.barrier()

    meta = dataclasses.replace(metadata) if metadata is not None else SAEMetadata()
    meta.extra = dict(meta.extra, train={"steps": cfg.steps, "tokens": N, "k": cfg.k, "final": metrics})
    with torch.no_grad():
        sae = TopKSAE(*(getattr(model, n).detach().cpu() for n in _PARAMS), k=cfg.k, metadata=meta,
                      activation_scale=scale)
    return TrainResult(sae=sae, activation_scale=scale, metrics=metrics, history=history, resumed_from=resumed_from,
                       data=data_info)


def _check_resumable(info: dict[str, Any], cfg: TrainConfig, data_info: dict[str, Any],
                     checkpoint_dir: Union[str, Path]) -> None:
    saved = info["config"]
    diff = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
            if k not in _RESUMABLE_CHANGES and saved.get(k) != v}
    if diff:
        raise ValueError(f"checkpoint {checkpoint_dir}/{_ckpt_name(info['step'])}.json was made with other "
                         f"settings (saved vs now: {diff}); use them, or another --checkpoint-dir")
    old = info["data"]
    if old != data_info:
        same_tokens = all(old.get(k) == data_info[k] for k in ("num_tokens", "d"))
        if same_tokens and old.get("stream") != data_info.get("stream"):
            def how(s: Optional[dict[str, Any]]) -> str:
                return ("in memory" if s is None else
                        f"streamed by {s['num_ranks']} process(es) through a buffer of {s['buffer_tokens']} tokens")

            raise ValueError(f"checkpoint {checkpoint_dir} was trained {how(old.get('stream'))}, this run would be "
                             f"trained {how(data_info.get('stream'))}: the batch order differs; resume with the "
                             f"same memory_budget_mb (--memory-mb) and number of processes, or use another "
                             f"--checkpoint-dir")
        raise ValueError(f"checkpoint {checkpoint_dir} was trained on other data ({old} vs "
                         f"{data_info}); resume on the same activations or use another --checkpoint-dir")
