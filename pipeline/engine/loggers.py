"""wandb mirror of the run store. metrics.csv is the source of truth: wandb lives in a thread of
its own, so the training loop never waits for it (its init can take `init_timeout` seconds
when the server cannot be reached), and a wandb failure is logged once and ignored."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import queue
import threading

from ..runs import redact
from ..runs.ids import folder_name, point_id, repeat_of
from ..runs.rundir import FINISHED

log = logging.getLogger(__name__)
SUMMARY_AT_CROSSING = ("pert_norm", "test_acc", "acc", "loss")


class NullLogger:
    def log(self, row: dict, crossed=()) -> None:
        pass

    def finish(self, state: str) -> None:
        pass

    def abandon(self) -> None:
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
    group = sweep name, tags = model/data/optimizer; the config carries `point_id` (the grid point
    without the repeat: the repeats of REPEATS=K share it) and `repeat` (`seed=1`), which the run's
    name ends with. Rows with step <= `sent_before` were
    mirrored by an earlier attempt and are not sent again. If the server cannot be reached the
    rows go to an offline run instead, which `make sync` uploads later."""

    def __init__(self, cfg, run_dir, rid: str, sent_before: int = -1, fence=None):
        lc = cfg.logger
        self.fence = fence or (lambda: None)  # raises once this process lost the run: mirror nothing more
        self.sent_before, self.finish_timeout = sent_before, float(lc.finish_timeout)
        self.init_kw = dict(
            project=lc.project, entity=lc.entity, group=folder_name(cfg, "") or None, id=rid,
            name=f"{rid} {repeat_of(cfg)}", resume="allow", dir=str(run_dir),  # (logger.name is the logger kind)
            # credentials and environment values masked; point_id: group by it to draw the repeats' mean and band
            config=dict(redact.config(cfg), point_id=point_id(cfg), repeat=repeat_of(cfg)),
            tags=[cfg.model.name, cfg.data.name, cfg.optim.name] + list(lc.get("tags") or []))
        self.mode, self.init_timeout = wandb_mode(lc.mode), float(lc.init_timeout)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="wandb-mirror", daemon=True)
        self.thread.start()

    # -- the training loop's side: never blocks --------------------------------------------
    def log(self, row: dict, crossed=()) -> None:
        if row["step"] > self.sent_before:
            self.queue.put(("row", row, list(crossed)))

    def finish(self, state: str) -> None:
        if not self.thread.is_alive():
            return
        self.queue.put(("finish", state, None))
        self.thread.join(self.finish_timeout)
        if self.thread.is_alive():
            log.warning("wandb did not finish within %.0f s; metrics.csv is complete (`make sync` "
                        "uploads offline runs)", self.finish_timeout)

    def abandon(self) -> None:
        """This process lost the run: stop mirroring without finishing the wandb run (its new
        owner goes on with it)."""
        self.queue.put(("abandon", None, None))

    # -- the mirror's thread ---------------------------------------------------------------------
    def _init(self):
        import wandb

        settings = wandb.Settings(silent=True, init_timeout=self.init_timeout)
        try:
            return wandb.init(mode=self.mode, settings=settings, **self.init_kw)
        except Exception as e:
            if self.mode != "online":
                raise
            log.warning("wandb unreachable (%s: %s); mirroring into an offline run instead "
                        "(`make sync` uploads it)", type(e).__name__, str(e).splitlines()[0][:200])
            wandb.teardown()  # its service still holds the run id of the failed attempt
            with contextlib.suppress(Exception):  # its analytics would wait on the server at exit
                from wandb.analytics.opentelemetry import opentelemetry_proxy

                opentelemetry_proxy.disable()
            return wandb.init(mode="offline", settings=settings, **self.init_kw)

    def _work(self) -> None:
        try:
            run = self._init()
        except Exception as e:
            log.warning("wandb unavailable (%s: %s); training goes on, metrics.csv is complete",
                        type(e).__name__, e)
            run = None
        while True:
            kind, item, crossed = self.queue.get()
            if kind == "abandon":
                return
            if run is not None:
                try:
                    self.fence()
                except Exception:  # LeaseLost: the run is another process's now
                    return
            if run is None:
                if kind == "finish":
                    return
                continue
            try:
                if kind == "finish":
                    run.summary["state"] = item
                    run.finish(exit_code=0 if item in FINISHED else 1)
                    return
                step = int(item["step"])
                data = {k: v for k, v in item.items() if v is not None and k != "step"}
                run.log(data, step=step)
                for t in crossed:  # decided by the training loop, once per threshold
                    run.summary.update({f"at_loss_{t:g}_{k}": data[k] for k in SUMMARY_AT_CROSSING
                                        if k in data} | {f"at_loss_{t:g}_step": step})
            except Exception as e:  # never let the mirror stop training
                log.warning("wandb logging stopped (%s: %s); metrics.csv is complete",
                            type(e).__name__, e)
                run = None


def make_logger(cfg, run_dir, rid: str, sent_before: int = -1, fence=None):
    if cfg.logger.name != "wandb":
        return NullLogger()
    return WandbLogger(cfg, run_dir, rid, sent_before, fence)
