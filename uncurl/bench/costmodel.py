"""A cost model of one MoE layer's All2All exchanges under expert parallelism (alpha-beta model).

Each of P ranks routes its own n tokens (top-k, capacity factor f) into a capacity buffer of E
experts x C slots x d values of s bytes, C = max(min_capacity, ceil(f n k / E)) (the rule of
`uncurl.config.ModelConfig.capacity`, which DeepSpeed's gate shares). One exchange hands the
whole buffer to all_to_all; the rank keeps 1/P of it and sends the rest as P - 1 messages:

    bytes = E C d s                   t = alpha (P - 1) + (P - 1) / P * bytes / bandwidth

with alpha the fixed cost of a message and bandwidth in bytes per second per direction. A layer
makes two exchanges of equal size (tokens out to the experts, results back). `fit` calibrates
alpha and the bandwidth on measured exchanges; `LINKS` holds published bandwidths to evaluate it
for the paper's GPUs. The paper's measurements (Sarkar et al. 2024, Fig. 2a, 4, 5) are kept
here, beside the setup they were measured in.
"""

from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from uncurl.config import ModelConfig


def buffer_bytes(cfg: ModelConfig, n_expert: int, tokens: int, dtype_bytes: int = 4) -> int:
    """Bytes one rank hands to one all_to_all: its (E, C, d) buffer at evaluation capacity."""
    capacity = cfg.capacity(tokens, n_expert, training=False)
    if capacity is None:
        raise ValueError(
            "dropless routing has no fixed buffer size: the bytes depend on the "
            "routing; set eval_capacity_factor"
        )
    return n_expert * capacity * cfg.n_embd * dtype_bytes


def features(nbytes, world) -> np.ndarray:
    """Columns of the model: messages per rank and bytes leaving a rank, per exchange."""
    nbytes, world = np.broadcast_arrays(np.asarray(nbytes, float), np.asarray(world, float))
    return np.column_stack([world - 1, nbytes * (world - 1) / world])


def exchange_time(nbytes, world, alpha: float, bandwidth: float) -> np.ndarray:
    """Seconds of one all_to_all of `nbytes` per rank among `world` ranks."""
    return features(nbytes, world) @ np.array([alpha, 1 / bandwidth])


@dataclass(frozen=True)
class Fit:
    alpha: float  # seconds per message
    bandwidth: float  # bytes per second per direction
    r2: float
    residuals: tuple[float, ...]  # measured minus predicted, seconds
    n_points: int


def fit(nbytes, world, seconds) -> Fit:
    """Least squares of the measured exchange times on the model, alpha and 1/bandwidth >= 0."""
    x, y = features(nbytes, world), np.asarray(seconds, float)
    if len(y) < 2 or np.linalg.matrix_rank(x) < 2:
        raise ValueError(
            "fitting alpha and the bandwidth needs exchanges of at least two sizes "
            "or two world sizes above 1"
        )
    (alpha, inv_bw), _ = nnls(x, y)
    resid = y - x @ np.array([alpha, inv_bw])
    r2 = 1 - (resid**2).sum() / ((y - y.mean()) ** 2).sum()
    return Fit(
        float(alpha),
        float(1 / inv_bw) if inv_bw else float("inf"),
        float(r2),
        tuple(resid.tolist()),
        len(y),
    )


# --------------------------------------------------------------------- published hardware


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per direction per GPU (peak)
    source: str


LINKS = (
    Link(
        "A100 SXM, NVLink 3",
        300e9,
        "NVIDIA A100 datasheet: NVLink 600 GB/s per GPU, both directions together",
    ),
    Link("A10, PCIe 4.0 x16", 32e9, "NVIDIA A10 datasheet: PCIe Gen4 64 GB/s, both directions"),
    Link("between nodes, InfiniBand HDR", 25e9, "Mellanox HDR InfiniBand: 200 Gb/s per port"),
)
# No datasheet gives a per-message cost; NCCL's small-message all-to-all latency within a node
# is of the order of ten microseconds, taken here as an assumption (shown as such in the book).
GPU_ALPHA = 10e-6


# ---------------------------------------------------------------------- the paper's numbers

# Fig. 4 (appendix): one MoE layer of a GPT-2 124M backbone (d_model 768), one sequence of 512
# tokens per GPU, DeepSpeed with expert parallelism 2 (data parallelism 8). Top-1; DeepSpeed's
# evaluation capacity factor 1.0 and minimum capacity 4. The paper does not give the GPU type
# or the precision (its models are trained in bf16): 2 bytes per value assumed.
PAPER_FIG4_CONFIG = ModelConfig(
    n_embd=768,
    n_head=12,
    n_layer=12,
    block_size=1024,
    vocab_size=50257,
    top_k=1,
    eval_capacity_factor=1.0,
    min_capacity=4,
)
PAPER_FIG4 = {"tokens": 512, "world": 2, "dtype_bytes": 2}
PAPER_FIG4_A2A_US = {8: 1920, 16: 2236, 32: 3916, 64: 3760, 128: 6591}
PAPER_FIG4_COMPUTE_US = 693.56
PAPER_SMALL_BACKBONE_PARAMS = 124e6  # Fig. 4 and 5: GPT-2's 124M, the shape of PAPER_FIG4_CONFIG
# Fig. 5: forward pass (ms) of 124M+32e, batch 1 x 256 tokens per GPU, against the number of GPUs.
PAPER_FIG5 = {"n_expert": 32, "batch_size": 1, "seq_len": 256}
PAPER_FIG5_MS = {1: 124.5, 2: 129.0, 4: 133.3, 8: 141.9}
# Fig. 2a: forward latency (ms) and validation loss of 354M+Xe on 8 A10 GPUs, batch 2 x 256
# per GPU, expert parallelism 2 (losses read off the plot).
PAPER_FIG2A_SETUP = {"gpus": 8, "batch_size": 2, "seq_len": 256, "world": 2}
PAPER_FIG2A = {
    1: (21.32, 2.81),
    8: (39.82, 2.72),
    32: (51.14, 2.65),
    64: (101.98, 2.59),
    128: (173.62, 2.56),
}


def paper_fig4_prediction(alpha: float = GPU_ALPHA, links=LINKS) -> list[dict]:
    """The model for Fig. 4's setup on each link: both exchanges of one layer, microseconds,
    beside the paper's measurement, and the per-message cost that would explain the paper."""
    rows = []
    cfg, setup = PAPER_FIG4_CONFIG, PAPER_FIG4
    for n_expert, measured in PAPER_FIG4_A2A_US.items():
        nbytes = buffer_bytes(cfg, n_expert, setup["tokens"], setup["dtype_bytes"])
        for link in links:
            model = 2 * exchange_time(nbytes, setup["world"], alpha, link.bandwidth)[0]
            wire = 2 * exchange_time(nbytes, setup["world"], 0.0, link.bandwidth)[0]
            rows.append(
                {
                    "n_expert": n_expert,
                    "link": link.name,
                    "buffer_bytes": nbytes,
                    "model_us": model * 1e6,
                    "paper_us": measured,
                    "paper_over_model": measured / (model * 1e6),
                    "alpha_to_match_us": (measured * 1e-6 - wire) / 2 / (setup["world"] - 1) * 1e6,
                }
            )
    return rows
