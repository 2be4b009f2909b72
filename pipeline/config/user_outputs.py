"""What the user's `_target_` code returns, checked once the data is loaded and before any run
directory exists (pipeline/attempt.py); importing it is checked with the config
(pipeline/user_code.py, from pipeline/config/validate.py). docs/custom.md says what each may return."""

from __future__ import annotations

from ..errors import ConfigError
from ..user_code import why


def check_model(cfg, data) -> None:
    """A user model, built once on the CPU and run on two training examples before any run
    directory exists: a module whose output has one row per example (and num_classes columns
    for classification)."""
    import torch

    from models import build_model

    target = cfg.model.get("_target_")
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    x = data.x_train[:2].cpu().to(next(model.parameters(), torch.zeros(())).dtype)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:
        raise ConfigError(f"model._target_={target}: its forward on input {tuple(x.shape)} failed "
                          f"({why(e)})") from None
    want = (len(x), data.num_classes) if data.task == "classification" else (len(x), *data.y_train.shape[1:])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model._target_={target}: output {got} for input {tuple(x.shape)}; allowed: {want} "
                          f"(one row per example{', a logit per class' if data.task == 'classification' else ''})")


def check_loss(objective, data) -> None:
    """The user's loss on two training examples and a zero output: a finite 0-d float tensor."""
    import torch

    from ..engine.losses import BUILT_IN

    if objective in BUILT_IN:
        return
    y = data.y_train[:2].cpu()
    c = data.num_classes if data.task == "classification" else (y.shape[1] if y.dim() > 1 else 1)
    out = torch.zeros(len(y), c, requires_grad=True)
    try:
        v = objective(out, y)
    except Exception as e:
        raise ConfigError(f"train.loss._target_={objective.name}: calling it on (output {tuple(out.shape)}, "
                          f"y {tuple(y.shape)}) failed ({why(e)})") from None
    if not (isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point() and torch.isfinite(v)):
        shown = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ConfigError(f"train.loss._target_={objective.name}: returned {shown}; allowed: a finite 0-d float "
                          "tensor, the SUM of the micro-batch's per-example losses (reduction='sum')")


def check_user_code(cfg, data) -> None:
    """What the user's targets return, checked once the data is loaded and before any run
    directory exists: the model's output, the loss's value (ConfigError, one line)."""
    from ..engine.losses import from_config

    loss = cfg.train.get("loss")
    if loss in ("ce", "mse") and data.task != "classification":
        raise ConfigError(f"train.loss={loss}: data={cfg.data.name} gives float targets (a regression); "
                          "allowed: auto (1/2 squared error) or a _target_ of your own")
    if cfg.model.name == "custom":
        check_model(cfg, data)
    check_loss(from_config(loss, data.task), data)
    if cfg.train.get("sharpness_every") is not None:
        check_all_trained(cfg, data)


def check_all_trained(cfg, data) -> None:
    """train.sharpness_every needs the Hessian of every parameter the loss depends on: a model
    with frozen parameters (requires_grad=False) would report the sharpness of a sub-block."""
    from models import build_model

    model = build_model(cfg.model, data.num_classes, data.input_shape)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        shown = ", ".join(frozen[:3]) + (", ..." if len(frozen) > 3 else "")
        raise ConfigError(f"train.sharpness_every={cfg.train.sharpness_every}: model={cfg.model.name} has parameters "
                          f"that do not require gradients ({shown}); allowed only with a model whose parameters "
                          "are all trained (or sharpness_every=null)")
