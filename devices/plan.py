"""Fit a model to a device: memory and decode speed of each quantization, and a recommendation.

Decode is modelled as reading every weight once per token plus a fixed cost per
layer (hundreds of small operator launches that a small model cannot hide):

    seconds per token = bytes read per token / memory bandwidth + layers × per-layer cost

Both constants were measured on the project's build machine (an AMD EPYC virtual
machine, 2 threads, 34 GB/s: profile build-vm-2core-24gb): SmolLM2-135M decodes at 94 tok/s as int4 (112 MB read per token)
and 46 tok/s as fp32 (540 MB), which gives an achieved fraction of bandwidth of
about 1.0 and 0.245 ms per layer. The per-layer cost scales with how fast one core
is; ``CORE_SPEED`` holds rough ratios to a core of that machine (assumptions, not
measurements: refine them with measurements on the boards).
"""

from __future__ import annotations

from dataclasses import dataclass

from jishi.devices.profiles import Profile

PER_LAYER_S = 0.245e-3  # measured on the build machine (see above)
BANDWIDTH_FRACTION = 1.0  # of the profile's bandwidth that weight reads reach (measured: ~1.0)
RUNTIME_OVERHEAD = 105 * 2**20  # Python, onnxruntime, tokenizer and prefill scratch: measured 105 MB once the
# weights file's pages that prepacking read are given back (runtime/memory.py; 130 MB before)
FREE_FOR_OS = 0.85  # of RAM the model may use; the rest is left to the system

# Rough single-core speed relative to a core of the build machine (assumption; see above).
CORE_SPEED = {"cortex-a72": 0.25, "cortex-a76": 0.5, "cortex-a78": 0.55, "apple-m1": 0.9, "x86-avx2": 0.6, "epyc": 1.0, "zen4": 1.0}

QUANTS = ("int4", "int8", "fp16", "fp32")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    # int4 projections with the zero-point correction (4 bytes per block of 32 per output): a GGUF grid with
    # float minima; off-grid weights are built onto integer zero points, which need none.
    int4_correction: bool = True

    @property
    def linear_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @classmethod
    def from_config(cls, name: str, c) -> "ModelShape":
        return cls(name, c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                   c.head_dim, c.vocab_size, c.tie_word_embeddings)


# Bytes per parameter as jishi stores them in memory (see export/quant.py).
_LINEAR = {"int4": 0.5 + 4 / 32 + 0.5 / 32, "int8": 1 + 4 / 32 + 1 / 32, "fp16": 4.0, "fp32": 4.0}
_CORRECTION = 4 / 32  # int4 with float block minima: the correction side path's fp32 per block and output
_HEAD = {"int4": 1 + 4 / 32, "int8": 1 + 4 / 32, "fp16": 4.0, "fp32": 4.0}  # LM head and embedding table


@dataclass(frozen=True)
class Estimate:
    quant: str
    weights_bytes: int
    kv_bytes: int
    memory_bytes: int
    read_per_token: int
    tokens_per_s: float
    fits: bool


def core_speed(profile: Profile) -> float:
    cpu = profile.cpu.lower()
    for key, speed in CORE_SPEED.items():
        if key.replace("-", "") in cpu.replace("-", "").replace(" ", ""):
            return speed
    if "zen 4" in cpu or "zen4" in cpu or "epyc" in cpu:
        return CORE_SPEED["zen4"]
    if "m1" in cpu and "apple" in cpu:
        return CORE_SPEED["apple-m1"]
    return CORE_SPEED["x86-avx2"] if profile.arch == "x86_64" else CORE_SPEED["cortex-a72"]


def estimate(model: ModelShape, profile: Profile, quant: str, context: int) -> Estimate:
    # Quantized, a tied table is stored once, but in memory the LM head's kernel holds its own prepacked copy
    # beside the codes the embedding lookup reads.
    head_tables = 1 if model.tied and quant in ("fp32", "fp16") else 2
    linear = _LINEAR[quant] + (_CORRECTION if quant == "int4" and model.int4_correction else 0.0)
    weights = int(model.linear_params * linear + head_tables * model.embedding_params * _HEAD[quant])
    kv = 2 * model.layers * model.kv_heads * model.head_dim * context * 4
    memory = weights + kv + RUNTIME_OVERHEAD
    read = int(model.linear_params * linear + model.embedding_params * _HEAD[quant])
    bandwidth = profile.bandwidth_gbs * 1e9 * BANDWIDTH_FRACTION
    seconds = read / bandwidth + model.layers * PER_LAYER_S / core_speed(profile)
    return Estimate(quant, weights, kv, memory, read, 1.0 / seconds, memory <= profile.ram_gb * 2**30 * FREE_FOR_OS)


def plan(model: ModelShape, profile: Profile, context: int = 2048) -> tuple[list[Estimate], Estimate | None, str]:
    """Estimates for every quantization, the recommended one (or None) and why."""
    rows = [estimate(model, profile, q, context) for q in QUANTS]
    fitting = [r for r in rows if r.fits]
    if not fitting:
        smallest = min(rows, key=lambda r: r.memory_bytes)
        return rows, None, (f"nothing fits in {profile.ram_gb:g} GB: the smallest build ({smallest.quant}) needs "
                            f"{smallest.memory_bytes / 2**30:.2f} GiB; use a smaller model or a shorter context")
    # int4 keeps quality within a fraction of a percent on jishi's exact-grid path and is the
    # fastest to read; prefer the fastest build that fits.
    best = max(fitting, key=lambda r: r.tokens_per_s)
    why = (f"{best.quant}: fits with {(profile.ram_gb * 2**30 * FREE_FOR_OS - best.memory_bytes) / 2**30:.2f} GiB to spare "
           f"and is the fastest that fits (~{best.tokens_per_s:.0f} tok/s estimated)")
    return rows, best, why


# --- memory a build needs (jishi build on this machine) ---------------------------------
# Measured on SmolLM2-135M and Gemma 3 270M (see docs/models.md): Python with torch, transformers and
# onnx imported, and the base's tokenizer (about 4 KB per vocabulary entry while it is converted). A GGUF
# is read one tensor at a time (distill/gguf_load.py): the float32 weights plus a few copies of the largest
# tensor. While the graph is written the float32 model and the bundle's bytes are held (each ready tensor
# leaves numpy as the graph takes it). For a GGUF base the float model is measured on the held-out text
# and let go before onnxruntime opens the bundle (its weights plus a prepacked copy, a window's logits).
# A Hugging Face directory loads through transformers (about twice the float32 weights at the peak) and
# its float model stays for the measurement.
BUILD_IMPORTS = 600 * 2**20
BUILD_BYTES_PER_TOKEN = 4096
BUILD_WINDOW = 512


CALIBRATION_TOKENS = 16 * 256  # the build's default calibration (sequences × tokens)


def build_memory(model: ModelShape, quant: str, gguf: bool = True, evaluate: bool = True,
                 calibrated: bool = False) -> int:
    """Peak memory (bytes) that building ``model`` at ``quant`` takes (``gguf``: from a GGUF file;
    ``calibrated``: int4 codes calibrated on text, layer by layer: one layer's float64 Hessians, their
    running sums, GPTQ's working copies of the widest weight group and the calibration hidden states)."""
    q = "int8" if quant == "gguf" else quant  # a GGUF's own grids cost at most int8's bytes
    params = model.linear_params + model.embedding_params * (1 if model.tied else 2)
    fp32 = 4 * params
    bundle = int(model.linear_params * _LINEAR[q] + model.embedding_params * _HEAD[q] * (1 if model.tied else 2))
    largest = 4 * max(model.embedding_params, model.hidden * model.intermediate)
    logits = BUILD_WINDOW * model.vocab * 4 * 2
    load = fp32 + 3 * largest if gguf else 2 * fp32
    write = fp32 + bundle + largest
    measure = (2 * bundle + logits + (0 if gguf else fp32)) if evaluate else 0
    calibrate = 0
    if calibrated:
        h, a, i = model.hidden, model.heads * model.head_dim, model.intermediate
        hessians = 8 * (2 * h * h + a * a + i * i)
        group = max((a + 2 * model.kv_heads * model.head_dim) * h, 2 * i * h, h * i)
        calibrate = fp32 + bundle + 2 * hessians + 8 * 4 * group + 2 * 4 * CALIBRATION_TOKENS * max(h, i)
    return int(BUILD_IMPORTS + model.vocab * BUILD_BYTES_PER_TOKEN + max(load, write, measure, calibrate))
