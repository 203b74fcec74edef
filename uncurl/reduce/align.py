"""Weight matching: permute a member expert's hidden neurons to line them up with its anchor's.

Sarkar et al. 2024, section 5.1, after Ainsworth et al. 2023 (Git Re-Basin): the permutation P
maximising <W_in^a, P W_in^y>_F + <W_out^a, W_out^y P^T>_F, a linear assignment over the d_ff
hidden neurons. Here w_fc = W_in^T (C, H) and w_proj = W_out^T (H, C), so anchor neuron i and
member neuron j score  w_fc^a[:, i] . w_fc^y[:, j] + w_proj^a[i] . w_proj^y[j]. Gated (SwiGLU)
experts score the sum over their three matrices, gate rows, up rows and down columns, which the
permutation moves together. In general every matrix of an expert with a neuron dim
(`MoELayer.neuron_dims`) adds its inner products; biases follow the permutation, unscored.

Solvers:
- "hungarian": exact, scipy's linear_sum_assignment (shortest augmenting paths, O(H^3) worst case).
- "greedy": fast and approximate. Each anchor neuron proposes its `candidates` best partners;
  proposals are accepted best first while both neurons are free, and the few neurons left over
  are matched exactly among themselves. O(H^2) for the candidate lists; `python -m uncurl.bench
  reduce` measures how much matching objective it gives up.
"""

import copy

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from uncurl.reduce.adapter import GPTLayer, adapt

SOLVERS = ("hungarian", "greedy")


def neuron_scores(w_fc_a, w_proj_a, w_fc_y, w_proj_y) -> torch.Tensor:
    """(H, H) score of placing member neuron j in anchor neuron i's slot (our experts)."""
    anchor, member = {"w_fc": w_fc_a, "w_proj": w_proj_a}, {"w_fc": w_fc_y, "w_proj": w_proj_y}
    return expert_scores(anchor, member, GPTLayer.neuron_dims)


def expert_scores(anchor: dict, member: dict, neuron_dims: dict) -> torch.Tensor:
    """(H, H) score of placing member neuron j in anchor neuron i's slot: the sum over the
    experts' matrices of the inner products of neuron i's and neuron j's weights (in float32 at
    least, on the experts' device)."""
    scores = None
    for name, a in anchor.items():
        dim = neuron_dims[name]
        if dim is None or a is None or a.dim() < 2:
            continue
        rows_a, rows_y = (t.movedim(dim, 0).flatten(1) for t in (a, member[name]))  # (H, rest)
        part = _at_least_float32(rows_a) @ _at_least_float32(rows_y).t()
        scores = part if scores is None else scores + part
    return scores


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def match_neurons(scores, solver: str = "hungarian", candidates: int = 16) -> np.ndarray:
    """perm, perm[i] = the member neuron placed in anchor slot i, maximising the total score."""
    scores = np.asarray(scores, dtype=np.float64)
    if solver == "hungarian":
        return linear_sum_assignment(scores, maximize=True)[1]
    if solver == "greedy":
        return _greedy_matching(scores, candidates)
    raise ValueError(f"unknown alignment solver {solver!r}; choose one of {SOLVERS}")


def matching_objective(scores, perm) -> float:
    scores = np.asarray(scores)
    return float(scores[np.arange(len(perm)), perm].sum())


def _greedy_matching(scores: np.ndarray, m: int) -> np.ndarray:
    h = len(scores)
    m = min(m, h)
    rows = np.repeat(np.arange(h), m)
    cols = torch.from_numpy(scores).topk(m, dim=1).indices.numpy().ravel()  # each row's m best
    perm, taken = np.full(h, -1), np.zeros(h, dtype=bool)
    for i in np.argsort(-scores[rows, cols], kind="stable"):
        r, c = rows[i], cols[i]
        if perm[r] < 0 and not taken[c]:
            perm[r], taken[c] = c, True
    free_rows, free_cols = np.flatnonzero(perm < 0), np.flatnonzero(~taken)
    sub = linear_sum_assignment(scores[np.ix_(free_rows, free_cols)], maximize=True)
    perm[free_rows[sub[0]]] = free_cols[sub[1]]
    return perm


@torch.no_grad()
def align_plan(model, plan: dict, solver: str = "hungarian") -> dict:
    """A copy of `plan` with a permutation for every non-anchor member that has none yet
    (`model`: our GPT, a transformers MoE model or their adapter), except in layers whose plan
    merges its members as they are ("align": false, HC-SMoE's own merge)."""
    plan = copy.deepcopy(plan)
    for layer, planned in zip(adapt(model).layers, plan["layers"], strict=True):
        if not planned.get("align", True):
            continue
        for group in planned["groups"]:
            a = group["anchor"]
            for i, m in enumerate(group["members"]):
                if m != a and group["perms"][i] is None:
                    scores = expert_scores(
                        layer.expert_params(a), layer.expert_params(m), layer.neuron_dims
                    )
                    group["perms"][i] = match_neurons(scores.cpu(), solver).tolist()
    return plan
