"""Optimizers by name, including the layer-wise adaptive ones of the large-batch SSL recipes.

- ``LARS`` (You et al. 2017), as SimCLR, BYOL, Barlow Twins, VICReg and MoCo v3 write it: weight
  decay is added to the gradient, then the sum is scaled by the trust ratio η ||w|| / ||g + wd w||.
- ``LARC`` (NVIDIA apex's ``LARC`` with ``clip=False``, what SwAV wraps its SGD in): the trust ratio
  is η ||w|| / (||g|| + wd ||w|| + ε), a sum of norms instead of the norm of the sum, and a parameter
  whose weight or gradient is zero takes a plain SGD step on its gradient, without weight decay.

Parameter groups flagged ``exclude_lars`` (biases and norms where a recipe excludes them, the online
probe) take plain SGD steps with their group's weight decay. Both keep the momentum buffer of
``torch.optim.SGD`` (the first step stores the update itself) and run without host synchronisation.
"""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-layer update g + wd w is scaled by η ||w|| / ||g + wd w||.

    The ratio is 1 where ||w|| or ||g + wd w|| is 0 (freshly zero-initialised biases). ``eps`` (0 by
    default: the official formulas have none) is added to the denominator.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 0.0,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, exclude_lars=False
        )
        super().__init__(params, defaults)

    def adapted(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """The gradient this optimizer's momentum buffer receives for parameter ``p``."""
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        if group["exclude_lars"]:
            return grad
        w_norm, g_norm = torch.norm(p), torch.norm(grad)
        trust = torch.where(
            (w_norm > 0) & (g_norm > 0),
            group["eta"] * w_norm / (g_norm + group["eps"]),
            torch.ones_like(w_norm),
        )
        return grad.mul(trust)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = self.adapted(p, p.grad, group)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


class LARC(LARS):
    """apex's LARC in its scaling mode (``clip=False``), as SwAV's ``main_swav.py`` uses it over SGD.

    g <- (g + wd w) · η ||w|| / (||g|| + wd ||w|| + ε)   where ||w|| > 0 and ||g|| > 0,
    g <- g                                              elsewhere (no weight decay either).
    """

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001
    ):
        super().__init__(params, lr, momentum, weight_decay, eta, eps=1e-8)

    def adapted(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> torch.Tensor:
        if group["exclude_lars"]:
            return grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else grad
        wd = group["weight_decay"]
        w_norm, g_norm = torch.norm(p), torch.norm(grad)
        ratio = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
        return torch.where((w_norm > 0) & (g_norm > 0), grad.add(p, alpha=wd) * ratio, grad)


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    for g in groups:
        g.setdefault("lr", g.get("base_lr", cfg.lr))
    name = cfg.optimizer
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "larc":
        return LARC(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {name!r}: use adam, adamw, sgd, lars or larc")
