"""wandb mirror of the run store. The run directory is the source of truth: a wandb failure is
logged once and training goes on without it."""

from __future__ import annotations

import logging
import netrc
import os

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class NullLogger:
    def log(self, row: dict) -> None:
        pass

    def finish(self, state: str) -> None:
        pass


def wandb_mode(requested: str) -> str:
    """`online` when credentials exist, `offline` when not; an explicit mode wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        if netrc.netrc().authenticators(host.split("/")[0]):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class WandbLogger:
    """One wandb run per run id (`resume="allow"`), so a resumed or requeued job continues it;
    group = sweep name, tags = model/data/optimizer."""

    def __init__(self, cfg, run_dir, rid: str):
        import wandb

        self.wandb = wandb
        lc = cfg.logger
        self.mode = wandb_mode(lc.mode)
        self.run = wandb.init(
            project=lc.project, entity=lc.entity, group=cfg.sweep.name or None, id=rid,
            name=lc.get("name") or rid, resume="allow", mode=self.mode, dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            tags=[cfg.model.name, cfg.data.name, cfg.optim.name] + list(lc.get("tags") or []),
            settings=wandb.Settings(silent=True, init_timeout=float(lc.init_timeout)),
        )
        self.broken = False
        self.pending = sorted(float(t) for t in cfg.train.loss_thresholds)

    def log(self, row: dict) -> None:
        if self.broken:
            return
        try:
            data = {k: v for k, v in row.items() if v is not None and k != "step"}
            self.run.log(data, step=int(row["step"]))
            for t in [t for t in self.pending if row["loss"] < t]:  # summary for the report's scatter plots
                self.pending.remove(t)
                self.run.summary.update({f"at_loss_{t:g}_{k}": v for k, v in data.items()
                                         if k in ("pert_norm", "test_acc", "step", "acc")} |
                                        {f"at_loss_{t:g}_step": int(row["step"])})
        except Exception as e:  # never let the mirror stop training
            self.broken = True
            log.warning("wandb logging stopped (%s: %s); metrics.csv is complete", type(e).__name__, e)

    def finish(self, state: str) -> None:
        try:
            self.run.summary["state"] = state
            self.run.finish(exit_code=0 if state in ("completed", "diverged") else 1)
        except Exception as e:
            log.warning("wandb finish failed (%s: %s)", type(e).__name__, e)


def make_logger(cfg, run_dir, rid: str):
    if cfg.logger.name != "wandb":
        return NullLogger()
    try:
        return WandbLogger(cfg, run_dir, rid)
    except Exception as e:
        log.warning("wandb unavailable (%s: %s); training goes on, metrics.csv is complete",
                    type(e).__name__, e)
        return NullLogger()
