"""Small models for quick runs and tests: a CNN and an MLP; the paper authors' plain CNN."""

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


class AuthorsCNN(nn.Module):
    """The plain CNN of the paper's authors' script (train_on_real_datasets.py, `--model cnn`):
    three blocks of two 3x3 convolutions ('same' padding) with ReLU and a 2x2 max-pool, 32, 64
    and 128 channels, then a 512-unit dense layer with ReLU and the class layer; no
    normalisation, PyTorch's default initialisation. Its layers are built in their order, so a
    seed gives the same theta_0 as theirs. On 32x32 images the dense layer sees 128 x 4 x 4 = 2048
    features, as theirs; other sizes (8x8 digits: 128) are allowed."""

    def __init__(self, num_classes=10, in_channels=3, image_size=(32, 32)):
        super().__init__()
        layers, cin = [], in_channels
        for c in (32, 64, 128):
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2, 2)]
            cin = c
        h, w = image_size[0] // 8, image_size[1] // 8
        layers += [nn.Flatten(), nn.Linear(128 * h * w, 512), nn.ReLU(), nn.Linear(512, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
