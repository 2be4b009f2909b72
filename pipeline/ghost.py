"""The ghost-batch rule, in one place: with `model.norm=bn` BatchNorm takes its statistics over
groups of `model.bn_group` consecutive examples (models/norm.py applies it), or over the whole
micro-batch when `bn_group` is null. The group is semantic: it changes what a step computes
(the run id hashes it, as `train.micro_batch` where ids have always had it); the micro-batch is
memory only, so it must carry whole groups. Read by the run id (pipeline/runs/ids.py), the
choice of `train.micro_batch=auto` (pipeline/engine/setup.py) and validation
(pipeline/config/validate.py).
"""

from __future__ import annotations


def uses_batch_norm(model) -> bool:
    """Whether the model config `model` (cfg.model) has ghost BatchNorm layers."""
    return model.get("norm") == "bn"


def ghost_size(model, micro_batch):
    """The number of examples per BatchNorm statistic: `model.bn_group`, or the micro-batch when
    it is null; None for a model without BatchNorm."""
    if not uses_batch_norm(model):
        return None
    return model.get("bn_group") or micro_batch


def micro_batch_unit(model) -> int:
    """What a micro-batch must be a multiple of: the BatchNorm group, else 1."""
    return (model.get("bn_group") if uses_batch_norm(model) else None) or 1


def micro_batch_problem(model, micro_batch) -> str | None:
    """Why `train.micro_batch` cannot carry whole BatchNorm groups (one line), or None."""
    group = model.get("bn_group")
    if not uses_batch_norm(model):
        return None
    if micro_batch == "auto" and not group:
        return ("train.micro_batch=auto: with model.norm=bn set model.bn_group too (the BatchNorm group "
                "is part of the experiment; the GPU's memory must not choose it)")
    if group and isinstance(micro_batch, int) and not isinstance(micro_batch, bool) and micro_batch % group:
        return (f"train.micro_batch={micro_batch}: with model.bn_group={group} allowed values are multiples "
                f"of {group} (a micro-batch carries whole BatchNorm groups) or auto")
    return None
