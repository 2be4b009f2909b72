"""Small models for quick runs and tests: a CNN and an MLP."""

from torch import nn

from .norm import norm2d

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class CNN(nn.Module):
    """conv-norm-relu-pool x3 then a linear head (airbench-style, but tiny)."""

    def __init__(self, num_classes=10, norm="none", width=16, in_channels=3):
        super().__init__()
        layers, cin = [], in_channels
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=norm == "none"), norm2d(norm, w),
                       nn.ReLU(), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x).amax(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, in_features, num_classes=10, width=128, depth=2, activation="relu"):
        super().__init__()
        act = ACTIVATIONS[activation]
        layers, cin = [nn.Flatten()], in_features
        for _ in range(depth):
            layers += [nn.Linear(cin, width), act()]
            cin = width
        layers.append(nn.Linear(cin, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
