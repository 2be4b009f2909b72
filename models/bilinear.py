"""The bilinear toy model of Section 6: E(theta) = 1/2 (y - theta_1 theta_2 x)^2."""

import torch
from torch import nn


class Bilinear(nn.Module):
    """Prediction theta_1 theta_2 x; with the regression loss 1/2 (y - f)^2
    (pipeline/engine/losses.py: HALF_SQ, data=bilinear) and the single example (x, y) = (2, 3/2) the
    full-batch loss is exactly the paper's E(theta) = 1/2 (y - theta_1 theta_2 x)^2."""

    def __init__(self, theta0=(2.8, 3.5)):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([float(t) for t in theta0]))

    def forward(self, x):
        return self.theta[0] * self.theta[1] * x
