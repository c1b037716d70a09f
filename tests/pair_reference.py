"""float64 formulas of the pair losses, written from their papers (tests only).

Each takes ``P``, a dict of ``[B]`` float64 tensors (``sw, sl`` policy sums, ``rw, rl`` log-
ratios, ``nw, nl`` lengths) and the options, and returns the BATCH loss (a scalar), so that
batch-coupled losses (AOT's sorting, the per-token mean NLL) are written as in the papers.
"""

from __future__ import annotations

import torch


def _logsig(x):
    return -torch.log1p(torch.exp(-x))  # moderate |x| in these tests


def _sig(x):
    return 1 / (1 + torch.exp(-x))


def f_score(r, kind="reverse_kl", alpha=0.5):
    """f'(u) at u = π/π_ref = e^r (Wang et al. 2024, Table 1)."""
    u = torch.exp(r)
    return {
        "reverse_kl": torch.log(u),
        "forward_kl": 1 - 1 / u,
        "js_divergence": torch.log(2 * u / (1 + u)),
        "alpha_divergence": (u ** (alpha - 1) - 1) / (alpha - 1),
    }[kind]


def _delta(P, o):
    return f_score(P["rw"], o["f"], o["fa"]) - f_score(P["rl"], o["f"], o["fa"])


def _per_token_delta(P, o):
    return f_score(P["rw"], o["f"], o["fa"]) / P["nw"] - f_score(P["rl"], o["f"], o["fa"]) / P["nl"]


def _smoothed(x, eps):
    return -(1 - eps) * _logsig(x) - eps * _logsig(-x)


def _exo(P, o):
    pw, pl = _sig(o["beta"] * _delta(P, o)), _sig(-o["beta"] * _delta(P, o))
    eps = o["eps"]
    return (pw * torch.log(pw / (1 - eps)) + pl * torch.log(pl / eps)).mean()


def _aot(P, o):
    policy = torch.sort(P["sw"] - P["sl"]).values
    ref = torch.sort((P["sw"] - P["rw"]) - (P["sl"] - P["rl"])).values
    return _smoothed(o["beta"] * (policy - ref), o["eps"]).mean()


def _aot_unpaired(P, o):
    x = torch.sort(P["rw"]).values - torch.sort(P["rl"]).values
    return _smoothed(o["beta"] * x, o["eps"]).mean()


def _discopop(P, o):
    x = o["beta"] * _delta(P, o)
    m = _sig(x / o["tau"])
    return ((1 - m) * -_logsig(x) + m * torch.exp(-x)).mean()


FORMULAS = {
    # Rafailov et al. 2023 eq. 7; cDPO (Mitchell 2023) with eps
    "sigmoid": lambda P, o: _smoothed(o["beta"] * _delta(P, o), o["eps"]).mean(),
    # SLiC-HF (Zhao et al. 2023) hinge on DPO's margin
    "hinge": lambda P, o: torch.clamp(1 - o["beta"] * _delta(P, o), min=0).mean(),
    # IPO (Azar et al. 2024) eq. 17 on per-token means
    "ipo": lambda P, o: ((_per_token_delta(P, o) - 1 / (2 * o["beta"])) ** 2).mean(),
    # EXO (Ji et al. 2024) eq. 16: KL(p_theta || p_rh)
    "exo_pair": _exo,
    # NCA (Chen et al. 2024) pairwise
    "nca_pair": lambda P, o: (
        -_logsig(o["beta"] * P["rw"])
        - 0.5 * _logsig(-o["beta"] * P["rw"])
        - 0.5 * _logsig(-o["beta"] * P["rl"])
    ).mean(),
    # Robust DPO (Chowdhury et al. 2024) eq. 7
    "robust": lambda P, o: (
        (
            (1 - o["eps"]) * -_logsig(o["beta"] * _delta(P, o))
            - o["eps"] * -_logsig(-o["beta"] * _delta(P, o))
        )
        / (1 - 2 * o["eps"])
    ).mean(),
    # BCO (Jung et al. 2024) on pairs, delta = 0
    "bco_pair": lambda P, o: (-_logsig(o["beta"] * P["rw"]) - _logsig(-o["beta"] * P["rl"])).mean(),
    # SPPO (Wu et al. 2024) eq. 4.7 with P = 1 for the winner, 0 for the loser, eta = 1/beta
    "sppo_hard": lambda P, o: (
        (P["rw"] - (1 - 0.5) / o["beta"]) ** 2 + (P["rl"] - (0 - 0.5) / o["beta"]) ** 2
    ).mean(),
    "aot": _aot,  # Melnyk et al. 2024
    "aot_unpaired": _aot_unpaired,
    # APO (D'Oosterlinck et al. 2024) eq. 7 and 8
    "apo_zero": lambda P, o: (1 - _sig(o["beta"] * P["rw"]) + _sig(o["beta"] * P["rl"])).mean(),
    "apo_down": lambda P, o: (
        _sig(o["beta"] * P["rw"]) + 1 - _sig(o["beta"] * (P["rw"] - P["rl"]))
    ).mean(),
    "discopop": _discopop,  # Lu et al. 2024 eq. 5
    # NLL of the chosen completions, per-token mean over the batch (RPO, Pang et al. 2024)
    "sft": lambda P, o: -P["sw_raw"].sum() / P["nw"].sum(),
    # length-normalised DPO
    "sigmoid_norm": lambda P, o: (-_logsig(o["beta"] * _per_token_delta(P, o))).mean(),
}


def options(beta=0.3, eps=0.0, tau=0.05, f="reverse_kl", fa=0.5) -> dict:
    return dict(beta=beta, eps=eps, tau=tau, f=f, fa=fa)


def pairs_dict(s, ref, n, s_raw=None) -> dict:
    """``P`` from concatenated ``[2B]`` sums, reference sums and lengths (float64)."""
    b = s.shape[0] // 2
    r = s - ref
    raw = s if s_raw is None else s_raw
    n = n.double()
    return dict(sw=s[:b], sl=s[b:], rw=r[:b], rl=r[b:], nw=n[:b], nl=n[b:], sw_raw=raw[:b])


def combined(P, o, types, weights, pair_weight=None):
    """TRL's combination: Σ_k w_k · mean(loss_k · pair_weight) (per-pair losses weighted)."""
    total = 0.0
    for name, w in zip(types, weights):
        if pair_weight is None:
            total = total + w * FORMULAS[name](P, o)
        elif name == "sft":  # the batch NLL, expanded per pair, times the pair weights
            total = total + w * FORMULAS[name](P, o) * pair_weight.mean()
        else:
            total = total + w * _weighted(name, P, o, pair_weight)
    return total


def _weighted(name, P, o, pair_weight):
    """mean_b(ℓ_b · w_b) from the batch formula, pair by pair (valid for per-pair types)."""
    per_pair = [
        FORMULAS[name]({k: v[i : i + 1] for k, v in P.items()}, o) for i in range(len(pair_weight))
    ]
    return (torch.stack(per_pair) * pair_weight).mean()


def wpo_pair_weight(s, log_sum_sq, n):
    """WPO (Zhou et al. 2024, eq. 2, TRL's aligned form): exp(mean_t(log p − log Σp²)),
    chosen times rejected; detached."""
    w = torch.exp((s - log_sum_sq) / n.double()).detach()
    b = s.shape[0] // 2
    return w[:b] * w[b:]


def naive_log_sum_sq(hidden, weight, labels, ignore_index=-100):
    """Σ_t log Σ_v p_tv² per sequence, float64, from full logits."""
    logits = hidden.double() @ weight.double().T
    per_token = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
    return (per_token * (labels != ignore_index)).sum(-1)


def naive_prefix_sums(token_logps, labels, ignore_index=-100):
    """Per-sequence sums over the first min(n_w, n_l) scored tokens (LD-DPO), float64."""
    mask = labels != ignore_index
    rank = torch.cumsum(mask, 1)  # 1-based rank of each scored token
    n = mask.sum(1)
    b = n.shape[0] // 2
    shared = torch.minimum(n[:b], n[b:]).repeat(2)
    return (token_logps * (mask & (rank <= shared[:, None]))).sum(1)
