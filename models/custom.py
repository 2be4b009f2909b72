"""A network of your own, `model=custom model._target_=pkg.module.MyNet` (docs/custom.md)."""

from torch import nn

from pipeline.errors import ConfigError
from pipeline.targets import accepts, call, kwargs, locate


def instantiate_model(model_cfg, num_classes: int, input_shape: tuple[int, ...]):
    """The user's torch.nn.Module; ConfigError when it is not one."""
    target = model_cfg["_target_"]
    fn = locate("model", target)
    kw = kwargs(model_cfg, "model")
    for name, value in (("num_classes", num_classes), ("input_shape", tuple(input_shape))):
        if name not in kw and accepts(fn, name):
            kw[name] = value
    model = call("model", target, fn, kw)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={target}: returned a {type(model).__name__}; allowed: a torch.nn.Module")
    return model
