"""Per-MoE-layer statistics of task data, streamed over batches (UNCURL's first step).

Every layer keeps running sums, never per-token arrays, so |T| can be large:
- selection counts (all k choices, and first choices) over real tokens;
- the Gram matrix sum_t h_t h_t^T of the pre-softmax router logits h, from which the cosine
  similarity of the logit columns follows exactly (O(Z^2) memory);
- on request, what other methods need: REAP's sum of gate x expert-output norm over routed tokens,
  HC-SMoE's sum of every expert's output over all tokens, NAEE's output error of every D-subset.

The pass is dropless by default: capacity only decides which routed tokens an expert computes, so
without it every token's routing and every expert output counts, whatever the batch composition.
"""

import dataclasses
import itertools

import numpy as np
import torch
from tqdm import tqdm

from uncurl.model import eval_mode
from uncurl.reduce.adapter import LayerIO, MoEAdapter, MoELayer, adapt

NAEE_MAX_EXPERTS = 16  # C(16, 8) = 12,870 subsets per layer is the most we enumerate


@dataclasses.dataclass
class LayerStats:
    layer: int  # index of the MoE layer in model.h
    top_k: int
    counts: np.ndarray  # (Z,) real tokens that chose each expert (any of the k choices)
    top1: np.ndarray  # (Z,) real tokens whose first choice each expert is
    gram: np.ndarray  # (Z, Z) sum over tokens of h h^T, h the pre-softmax logits
    n_tokens: int = 0
    reap_sum: np.ndarray | None = None  # (Z,) sum over routed tokens of gate * ||E(x)||
    output_sum: np.ndarray | None = None  # (Z, C) sum over all tokens of E(x)
    subsets: np.ndarray | None = None  # (S, D) every D-subset of experts, for NAEE
    subset_error: np.ndarray | None = None  # (S,) sum over tokens of ||y - y_subset||^2
    cap_top_k: bool = False  # the reduced model routes to min(top_k, D) experts (transformers)

    @property
    def n_expert(self) -> int:
        return len(self.counts)

    def similarity(self) -> np.ndarray:
        """(1 + cos) / 2 of the logit columns H[:, i], H[:, j] over all tokens, in [0, 1]."""
        norm = np.sqrt(np.clip(np.diag(self.gram), 1e-300, None))
        return (1 + self.gram / np.outer(norm, norm)) / 2

    def frequency(self) -> np.ndarray:
        return self.counts / max(1, self.counts.sum())

    def reap_score(self) -> np.ndarray:
        """REAP saliency: mean of gate x ||E(x)|| over the tokens routed to each expert."""
        return self.reap_sum / np.maximum(self.counts, 1)

    def mean_output(self) -> np.ndarray:
        """HC-SMoE's representation: each expert's output averaged over all tokens."""
        return self.output_sum / max(1, self.n_tokens)


def collect_stats(
    model, batches, needs=(), subset_size: int | None = None, dropless: bool = True
) -> list[LayerStats]:
    """One pass of `batches` (tasks.Batch) through `model` (our GPT, a transformers MoE model or
    their adapter, `uncurl.reduce.adapter`), on the model's device; `needs` adds "reap",
    "outputs", "naee" (the last with `subset_size` = D)."""
    if "naee" in needs and subset_size is None:
        raise ValueError("NAEE statistics need subset_size, the D of the subsets to enumerate")
    adapter = adapt(model)
    stats = [_empty(adapter, layer, needs, subset_size) for layer in adapter.layers]
    with torch.no_grad(), eval_mode(adapter.model):
        for batch in tqdm(batches, desc="statistics", unit="batch", disable=None, leave=False):
            adapter.visit_layers(
                batch, lambda i, io: _update(stats[i], adapter.layers[i], io), dropless
            )
    return stats


def _empty(adapter: MoEAdapter, layer: MoELayer, needs, subset_size) -> LayerStats:
    z, c = layer.n_expert, adapter.width
    st = LayerStats(
        layer.index,
        adapter.top_k,
        np.zeros(z, np.int64),
        np.zeros(z, np.int64),
        np.zeros((z, z)),
        cap_top_k=adapter.cap_top_k,
    )
    if "reap" in needs:
        st.reap_sum = np.zeros(z)
    if "outputs" in needs:
        st.output_sum = np.zeros((z, c))
    if "naee" in needs:
        if z > NAEE_MAX_EXPERTS:
            raise ValueError(
                f"naee enumerates all C({z}, {subset_size}) expert subsets; it is "
                f"for layers of at most {NAEE_MAX_EXPERTS} experts"
            )
        st.subsets = np.array(list(itertools.combinations(range(z), subset_size)))
        st.subset_error = np.zeros(len(st.subsets))
    return st


def _update(st: LayerStats, layer: MoELayer, io: LayerIO) -> None:
    x, y, logits, experts, gates = io  # (N, C), (N, C), (N, Z), (N, k), (N, k)
    z = st.n_expert
    st.n_tokens += len(x)
    st.counts += torch.bincount(experts.reshape(-1), minlength=z).cpu().numpy()
    st.top1 += torch.bincount(experts[:, 0], minlength=z).cpu().numpy()
    h = logits.double()
    st.gram += (h.t() @ h).cpu().numpy()
    if st.reap_sum is not None:
        st.reap_sum += _reap_sums(layer, x, experts, gates)
    if st.output_sum is None and st.subsets is None:
        return
    outs = torch.stack([layer.expert(e, x) for e in range(z)])  # (Z, N, C)
    if st.output_sum is not None:
        st.output_sum += outs.double().sum(1).cpu().numpy()
    if st.subsets is not None:
        st.subset_error += _subset_errors(layer, logits, outs, y, st.subsets)


def _reap_sums(layer: MoELayer, x, experts, gates) -> np.ndarray:
    sums = np.zeros(layer.n_expert)
    for e in experts.unique().tolist():
        rows, slot = (experts == e).nonzero(as_tuple=True)
        norms = layer.expert(e, x[rows]).norm(dim=-1)
        sums[e] = (gates[rows, slot] * norms).double().sum().item()
    return sums


def _subset_errors(layer: MoELayer, logits, outs, y, subsets: np.ndarray) -> np.ndarray:
    """sum_t ||y_t - y_t(S)||^2 for each subset S, where y(S) is the layer's output with only S's
    experts and router rows kept (router 'keep'): the layer's own gating over S's logits (ours:
    top-k of the softmax over S).

    Expanded as ||y||^2 - 2 sum_j g_j <y, E_j> + sum_jl g_j g_l <E_j, E_l> over the k chosen
    experts, from per-token dot products, so no subset's output is ever materialised."""
    per_token = outs.transpose(0, 1).double()  # (N, Z, C)
    y = y.double()
    dots = torch.einsum("nzc,nc->nz", per_token, y)  # (N, Z)
    gram = per_token @ per_token.transpose(1, 2)  # (N, Z, Z)
    n, d = len(y), subsets.shape[1]
    rows = torch.arange(n, device=y.device)[:, None, None]
    chunk = max(1, 2**22 // (n * d))  # bounds the (N, chunk, D) gathered logits
    errors = []
    for i in range(0, len(subsets), chunk):
        s = torch.from_numpy(subsets[i : i + chunk]).to(logits.device)  # (S, D)
        gates, pos = layer.route(logits[:, s], s)  # (N, S, k)
        gates = gates.double()
        chosen = s[torch.arange(len(s), device=s.device)[:, None], pos]  # (N, S, k) expert ids
        cross = (gates * dots[rows, chosen]).sum((0, 2))  # (S,)
        pairs = gram[rows[..., None], chosen[..., :, None], chosen[..., None, :]]  # (N, S, k, k)
        quad = (gates[..., :, None] * gates[..., None, :] * pairs).sum((0, 2, 3))  # (S,)
        errors.append(((y * y).sum() - 2 * cross + quad).cpu().numpy())
    return np.concatenate(errors)
