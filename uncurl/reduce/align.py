"""Weight matching: permute a member expert's hidden neurons to line them up with its anchor's.

Sarkar et al. 2024, section 5.1, after Ainsworth et al. 2023 (Git Re-Basin): the permutation P
maximising <W_in^a, P W_in^y>_F + <W_out^a, W_out^y P^T>_F, a linear assignment over the d_ff
hidden neurons. Here w_fc = W_in^T (C, H) and w_proj = W_out^T (H, C), so anchor neuron i and
member neuron j score  w_fc^a[:, i] . w_fc^y[:, j] + w_proj^a[i] . w_proj^y[j].

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

SOLVERS = ("hungarian", "greedy")


def neuron_scores(w_fc_a, w_proj_a, w_fc_y, w_proj_y) -> torch.Tensor:
    """(H, H) score of placing member neuron j in anchor neuron i's slot."""
    return w_fc_a.t() @ w_fc_y + w_proj_a @ w_proj_y.t()


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
    """A copy of `plan` with a permutation for every non-anchor member that has none yet."""
    plan = copy.deepcopy(plan)
    for moe, layer in zip(model.moe_blocks, plan["layers"], strict=True):
        for group in layer["groups"]:
            a = group["anchor"]
            for i, m in enumerate(group["members"]):
                if m != a and group["perms"][i] is None:
                    scores = neuron_scores(moe.w_fc[a], moe.w_proj[a], moe.w_fc[m], moe.w_proj[m])
                    group["perms"][i] = match_neurons(scores, solver).tolist()
    return plan
