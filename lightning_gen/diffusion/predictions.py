"""What the network predicts, and exact conversions between the three parametrisations.

With x_t = a x + b z, the network is trained to predict y = c(t) x + d(t) z:

    eps: y = z                      (c, d) = (0, 1)      Ho et al. 2020
    x:   y = x                      (c, d) = (1, 0)
    v:   y = a'(t) x + b'(t) z      (c, d) = (a', b')    the velocity dx_t/dt

v is the velocity of x_t along its path: z - x for rectified flow. For a variance-preserving process
written with an angle, a = cos(phi), b = sin(phi), it is phi'(t) (cos(phi) z - sin(phi) x): the
"v" of Salimans & Ho 2022 (alpha z - sigma x) times phi' = a b' - b a'.

Given x_t and y, (x, z) solve the 2x2 system [a b; c d] (x, z) = (x_t, y), determinant a d - b c:

    eps: x = (x_t - b y) / a                        singular where a = 0 (pure noise)
    x:   z = (x_t - a y) / b                        singular where b = 0 (clean data)
    v:   x = (b' x_t - b y) / (a b' - b a'),  z = (a y - a' x_t) / (a b' - b a')
         (a b' - b a' = 1 for flow, phi' for VP, sigma' for VE: never zero)
"""

from __future__ import annotations

import torch

from lightning_gen.diffusion.processes import Coefficients

PREDICTIONS = ("eps", "x", "v")


def target_coefficients(prediction: str, coef: Coefficients):
    """(c, d) with target y = c x + d z."""
    if prediction == "eps":
        return 0.0, 1.0
    if prediction == "x":
        return 1.0, 0.0
    if prediction == "v":
        return coef.da, coef.db
    raise ValueError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")


def training_target(prediction: str, x: torch.Tensor, z: torch.Tensor, coef: Coefficients) -> torch.Tensor:
    """y = c x + d z for the data x and noise z that made x_t (coefficients broadcastable to x)."""
    if prediction == "eps":
        return z
    if prediction == "x":
        return x
    c, d = target_coefficients(prediction, coef)
    return c * x + d * z


def to_x_and_eps(prediction: str, y: torch.Tensor, xt: torch.Tensor, coef: Coefficients):
    """(x_hat, eps_hat) implied by the prediction y at x_t."""
    a, b = coef.a, coef.b
    if prediction == "eps":
        return (xt - b * y) / a, y
    if prediction == "x":
        return y, (xt - a * y) / b
    if prediction == "v":
        det = a * coef.db - b * coef.da
        return (coef.db * xt - b * y) / det, (a * y - coef.da * xt) / det
    raise ValueError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")


def from_x_and_eps(prediction: str, x: torch.Tensor, eps: torch.Tensor, coef: Coefficients) -> torch.Tensor:
    """The prediction y = c x + d z of the given (x, eps)."""
    return training_target(prediction, x, eps, coef)


def convert(source: str, target: str, y: torch.Tensor, xt: torch.Tensor, coef: Coefficients) -> torch.Tensor:
    """A prediction of kind ``source`` expressed as one of kind ``target`` (the identity when equal)."""
    if source == target:
        return y
    return from_x_and_eps(target, *to_x_and_eps(source, y, xt, coef), coef)
