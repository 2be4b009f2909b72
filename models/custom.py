"""A network of your own, `model=custom model._target_=pkg.module.MyNet` (docs/custom.md)."""

from torch import nn

from pipeline.errors import ConfigError
from pipeline.user_code import accepts, call, kwargs, locate


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
    return materialized(model, target, input_shape)


def materialized(model: nn.Module, target: str, input_shape: tuple[int, ...]) -> nn.Module:
    """A model with lazily shaped modules (nn.LazyLinear, nn.LazyConv2d, ...) given its shapes by one
    forward pass on two zero inputs, in eval mode (BatchNorm's running averages do not move) and
    without gradients, so that its parameters exist before they are counted, stacked or
    optimised; its initial values come from the generator as any module's do."""
    import torch
    from torch.nn.parameter import is_lazy

    if not any(is_lazy(p) for p in model.parameters()) and not any(is_lazy(b) for b in model.buffers()):
        return model
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape))
    except Exception as e:
        raise ConfigError(f"model._target_={target}: has lazily shaped modules, and a forward on input "
                          f"{(2, *input_shape)} to shape them failed ({type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:120]})") from None
    return model.train(training)
