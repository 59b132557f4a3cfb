"""Benchmark shapes derived from the real model configurations, and the named sets that run.

Token counts come from each transformer's diffusers config and its pipeline's defaults (VAE
downsampling, patch size, text length, classifier-free-guidance batch), so a row's `N` is the
number of tokens a steering site really sees, not a round number. SAE widths are 4x-32x the
site width, k from 32 to 128 (spec §4).
"""
from __future__ import annotations

from dataclasses import dataclass

OPS = ("steer", "topk_encode", "sparse_decode")
GEMM_OP = "encoder_gemm"  # cuBLAS x @ W_enc alone: the spec §6 floor each fused op is compared to
LATENCY_N = 16  # spec §5-6 latency shape: a handful of tokens, launch overhead dominates


@dataclass(frozen=True)
class ModelConfig:
    """The config fields that fix a steering site's width and token count."""

    key: str                    # short id used in shape names
    repo: str                   # Hugging Face repo id
    num_attention_heads: int    # transformer config
    attention_head_dim: int     # transformer config
    num_layers: int             # transformer blocks holding steering sites
    patch: int                  # latent pixels per token side
    vae_scale_factor: int       # image pixels per latent pixel
    text_tokens: int            # text tokens in the joint sequence (pipeline defaults)
    batch: int                  # 2 under classifier-free guidance
    site: str                   # where steering attaches and which tokens it sees
    site_sees_text: bool        # the site's sequence holds the text tokens too

    @property
    def d(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def image_tokens(self, resolution: int) -> int:
        side = resolution // (self.vae_scale_factor * self.patch)
        return side * side

    def site_tokens(self, resolution: int) -> int:
        """N: rows of the `[N, d]` activation one steering call sees at this resolution."""
        per_image = self.image_tokens(resolution) + (self.text_tokens if self.site_sees_text else 0)
        return self.batch * per_image

    def describe(self, resolution: int) -> str:
        text = f" + {self.text_tokens} text" if self.site_sees_text else ""
        return f"{resolution}², {self.image_tokens(resolution)} image{text} tokens x batch {self.batch}"


MODELS: dict[str, ModelConfig] = {m.key: m for m in (
    # FluxTransformer2DModel: 24 heads x 128; patch_size 1 on latents the pipeline packs 2x2;
    # T5 max_sequence_length 512; guidance-distilled, so batch 1. Single-stream blocks see
    # image and text tokens concatenated (spec §4).
    ModelConfig("flux1-dev", "black-forest-labs/FLUX.1-dev", 24, 128, 19 + 38, 2, 8, 512, 1,
                "single_transformer_blocks.* (image + text stream)", True),
    # SD3Transformer2DModel, SD3.5 Large: 38 heads x 64 = caption_projection_dim 2432, 38 joint
    # blocks, patch_size 2; text 77 CLIP + 256 T5 tokens; CFG batch 2. Steering edits the
    # image stream, output[1] of a joint block (spec §4).
    ModelConfig("sd35-large", "stabilityai/stable-diffusion-3.5-large", 38, 64, 38, 2, 8, 77 + 256, 2,
                "transformer_blocks.* output[1] (image stream)", False),
    # SD3.5 Medium: 24 heads x 64 = caption_projection_dim 1536, 24 joint blocks (MMDiT-X).
    ModelConfig("sd35-medium", "stabilityai/stable-diffusion-3.5-medium", 24, 64, 24, 2, 8, 77 + 256, 2,
                "transformer_blocks.* output[1] (image stream)", False),
)}


@dataclass(frozen=True)
class Shape:
    """One `[N, d]` activation and an SAE of width `F` with `k` active features."""

    model: str
    N: int
    d: int
    F: int
    k: int
    context: str  # where N comes from, for the report

    @property
    def expansion(self) -> int:
        return self.F // self.d

    @property
    def id(self) -> str:
        return f"{self.model}-{self.expansion}x-k{self.k}-N{self.N}"

    @property
    def family(self) -> str:
        """Shapes that differ only in N: one line in the plots against N."""
        return f"{self.model}-{self.expansion}x-k{self.k}"


def model_shape(model: str, resolution: int, expansion: int, k: int) -> Shape:
    """The shape a steering site of `model` sees at `resolution`², SAE width `expansion * d`."""
    m = MODELS[model]
    return Shape(model, m.site_tokens(resolution), m.d, expansion * m.d, k, m.describe(resolution))


def n_shape(model: str, N: int, expansion: int, k: int, context: str) -> Shape:
    """A shape at the model's width with an explicit token count (latency, N sweeps)."""
    m = MODELS[model]
    return Shape(model, N, m.d, expansion * m.d, k, context)


@dataclass(frozen=True)
class Entry:
    """A shape, the ops measured at it, and which baselines also get a torch.compile'd row
    (compiling costs tens of seconds per graph, so only a few shapes get one)."""

    shape: Shape
    ops: tuple[str, ...] = ("steer",)
    compile: tuple[str, ...] = ()  # subset of ("reference", "anchor")
    compiled_ops: tuple[str, ...] = OPS  # the ops whose baselines get compiled rows


BOTH = ("reference", "anchor")


def _quick() -> list[Entry]:
    # The spec §6 shapes first, so a run cut short still has the target ratios.
    return [
        Entry(model_shape("flux1-dev", 1024, 4, 32), OPS, BOTH, ("steer",)),
        Entry(model_shape("flux1-dev", 1024, 16, 64), ("steer",), ("anchor",)),
        Entry(n_shape("flux1-dev", LATENCY_N, 4, 32, "latency"), ("steer",)),
        Entry(model_shape("flux1-dev", 512, 4, 32), ("steer",)),
        Entry(model_shape("sd35-large", 1024, 4, 32), ("steer",)),
    ]


def _full() -> list[Entry]:
    flux = [
        Entry(model_shape("flux1-dev", 1024, 4, 32), OPS, BOTH),
        Entry(model_shape("flux1-dev", 1024, 16, 64), OPS, BOTH, ("steer",)),
        Entry(n_shape("flux1-dev", LATENCY_N, 4, 32, "latency"), OPS),
        Entry(n_shape("flux1-dev", LATENCY_N, 16, 64, "latency")),
        Entry(model_shape("flux1-dev", 1024, 8, 64)),
        Entry(model_shape("flux1-dev", 1024, 32, 128)),
        Entry(model_shape("flux1-dev", 512, 4, 32)),
        Entry(model_shape("flux1-dev", 512, 16, 64)),
    ]
    # N sweep at the FLUX 4x shape: batch 2 at 1024² and a few sizes between latency and 512².
    sweep = [Entry(n_shape("flux1-dev", n, 4, 32, "N sweep")) for n in (64, 256, 1024)]
    sweep.append(Entry(n_shape("flux1-dev", 2 * MODELS["flux1-dev"].site_tokens(1024), 4, 32, "1024², batch 2")))
    sd = [
        Entry(model_shape("sd35-large", 1024, 4, 32), OPS, BOTH, ("steer",)),
        Entry(model_shape("sd35-large", 1024, 16, 64)),
        Entry(model_shape("sd35-large", 512, 4, 32)),
        Entry(n_shape("sd35-large", LATENCY_N, 4, 32, "latency")),
        Entry(model_shape("sd35-medium", 1024, 4, 32), ("steer",), BOTH),
        Entry(model_shape("sd35-medium", 1024, 16, 64)),
        Entry(model_shape("sd35-medium", 1024, 32, 128)),
        Entry(model_shape("sd35-medium", 512, 4, 32)),
    ]
    return flux + sweep + sd


def _cpu() -> list[Entry]:
    # A small SAE (4 MB per weight matrix, cache-resident) so a shared 2-core CI runner
    # finishes in seconds; even SD3.5 Medium's width makes every call memory-bound and slow
    # there. CPU numbers show that the harness works and how the references scale with N;
    # they say nothing about a GPU.
    return [Entry(Shape("cpu-small", n, 512, 4 * 512, 32, "CPU N sweep"), ops, BOTH if n == 64 else (), ("steer",))
            for n, ops in ((64, OPS), (LATENCY_N, ("steer",)), (256, ("steer",)))]


SETS = {"quick": _quick, "full": _full, "cpu": _cpu}
GPU_SETS = ("quick", "full")
# Wall-clock seconds after which a run starts no new row, so the full set ends in under ten
# minutes on a GPU and --quick in about two (docs/benchmarks.md); rows not reached are listed
# in every output.
DEFAULT_TIME_BUDGET_S = {"quick": 110.0, "full": 540.0, "cpu": None}


def entries(set_name: str) -> list[Entry]:
    if set_name not in SETS:
        raise ValueError(f"unknown benchmark set {set_name!r}; known: {sorted(SETS)}")
    return SETS[set_name]()
