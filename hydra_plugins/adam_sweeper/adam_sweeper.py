"""Hydra sweeper for the run store (`hydra/sweeper=adam`): Hydra's basic grid expansion, then,
before anything is launched,

1. every grid point is composed and validated (a bad value stops the whole sweep, naming the
   key and the grid point; nothing reaches the launcher);
2. every point is registered in the sweep folder `<paths.sweeps>/<sweep.name>/`: its run
   directory is created (`pending`, with `config.yaml`) and linked as `<run_id>`, so analysis
   finds the sweep's runs and two sweeps that share a configuration share its run;
3. completed runs are skipped, and diverged or failed ones too unless `retry=true`;
4. the rest is launched in batches of `max_batch_size` (bounded local parallelism).

`plan.json` in the sweep folder lists the points and which were launched, in launch order
(`make sweep` uses it to map Slurm array tasks to runs). `dry_run=true` stops after step 3.
(No `from __future__ import annotations` here: Hydra loads plugin modules outside
sys.modules, where dataclasses cannot resolve string annotations.)
"""


import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

log = logging.getLogger(__name__)


@dataclass
class AdamSweeperConf:
    _target_: str = "hydra_plugins.adam_sweeper.adam_sweeper.AdamSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    dry_run: bool = False


ConfigStore.instance().store(group="hydra/sweeper", name="adam", node=AdamSweeperConf,
                             provider="adam-implicit-bias")


class AdamSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 dry_run: bool = False) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.dry_run = dry_run

    def sweep(self, arguments: list[str]) -> Any:
        from pipeline.store import RunDir, run_id
        from pipeline.validate import ConfigError, validate

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        points = self.split_arguments(overrides, None)[0]

        plan, todo = [], []
        for ov in points:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(ov))
            with open_dict(cfg):  # the job's view: its task function never sees `hydra`
                del cfg["hydra"]
            try:
                validate(cfg)
            except ConfigError as e:
                shown = [o for o in ov if not o.startswith(("paths.", "retry=", "sweep=", "hydra."))]
                raise ConfigError(f"{e} (grid point: {' '.join(shown)})") from None
            rid = run_id(cfg)
            run = RunDir(cfg.paths.runs, rid)
            state = run.status().get("state")
            launch = not (state == "completed" or (state in ("diverged", "failed") and not cfg.retry))
            plan.append(dict(run_id=rid, overrides=list(ov), state=state or "new", launch=launch,
                             _cfg=cfg, _run=run))
            if launch:
                todo.append(list(ov))

        name = self.config.sweep.name or "adhoc"
        folder = Path(self.config.paths.sweeps) / name
        folder.mkdir(parents=True, exist_ok=True)
        for p in plan:
            _register(p.pop("_run"), p.pop("_cfg"), folder)
        launched = [p["run_id"] for p in plan if p["launch"]]
        (folder / "plan.json").write_text(json.dumps(dict(sweep=name, points=plan, launched=launched), indent=1))
        log.info("sweep %s: %d runs, %d to launch, %d skipped (%s)", name, len(plan), len(todo),
                 len(plan) - len(todo), folder)
        if self.dry_run or not todo:
            return []
        n = self.max_batch_size or len(todo)
        returns, idx = [], 0
        for i in range(0, len(todo), n):
            batch = todo[i:i + n]
            results = self.launcher.launch(batch, initial_job_idx=idx)
            for r in results:
                _ = r.return_value  # re-raise a job's exception
            idx += len(batch)
            returns.append(results)
        return returns


def _register(run, cfg, folder: Path) -> None:
    """Create the run directory (pending) if new, and link it from the sweep folder."""
    if not run.status():
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)
        run.write_status(state="pending", step=0, attempts=0)
    link = folder / run.id
    target = os.path.relpath(run.path.resolve(), folder.resolve())
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
