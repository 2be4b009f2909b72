"""`make report SWEEP=<name>`: a W&B report for one sweep with the paper's panels, built with
wandb's reports API (`pip install wandb-workspaces`, the project's `report` extra).

Panels: training loss and perturbed one-norm per step (Figures 6-7), and the perturbed
one-norm and test accuracy at the first step with loss < T against beta, rho and h
(Figures 4-5). Saving needs the network and credentials; `build_report` alone does not.
"""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf


def build_report(sweep: str, project: str, entity: str, thresholds=(0.1, 0.01)):
    import wandb_workspaces.reports.v2 as wr

    # the repeats of a grid point (REPEATS=K) share config.point_id: grouped by it, each point is
    # one line (the mean over its repeats) and a min-max band
    runset = wr.Runset(entity=entity, project=project, name=sweep,
                       filters=f"Group = '{sweep}'" if sweep else "", groupby=["config.point_id"])
    band = dict(groupby=wr.Config("point_id"), groupby_aggfunc="mean", groupby_rangefunc="minmax")
    curves = [wr.LinePlot(title="training loss", x="Step", y=["loss"], log_y=True, **band),
              wr.LinePlot(title="perturbed one-norm ||grad E||_{1,eps}", x="Step", y=["pert_norm"],
                          log_y=True, **band),
              wr.LinePlot(title="test accuracy", x="Step", y=["test_acc"], **band)]
    scatter = []
    for t in thresholds:
        for param in ("beta", "rho", "h"):
            for metric in ("pert_norm", "test_acc"):
                scatter.append(wr.ScatterPlot(
                    title=f"{metric} at first loss < {t:g} vs {param}",
                    x=wr.Config(f"optim.{param}"), y=wr.SummaryMetric(f"at_loss_{t:g}_{metric}"),
                    log_x=param == "h"))
    return wr.Report(
        project=project, entity=entity, title=f"Full-batch Adam: sweep {sweep}",
        description="Curves and threshold-crossing metrics of 'On the Implicit Bias of Adam' experiments.",
        blocks=[wr.H1(text=f"Sweep {sweep}"),
                wr.P(text="Rows describe theta_n before the update; pert_norm = sum_i sqrt(g_i^2 + eps)."),
                wr.PanelGrid(runsets=[runset], panels=curves),
                wr.H2(text="At the loss thresholds (Figures 4-6)"),
                wr.PanelGrid(runsets=[runset], panels=scatter)])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__)
    ap.add_argument("sweep")
    ap.add_argument("--project", default=None)
    ap.add_argument("--entity", default=None)
    ap.add_argument("--dry-run", action="store_true", help="build, print, do not save")
    a = ap.parse_args(argv)
    conf = OmegaConf.load("conf/logger/wandb.yaml")
    project = a.project or conf.project
    entity = a.entity or conf.entity
    if entity is None:
        import wandb

        entity = wandb.Api().default_entity
    report = build_report(a.sweep, project, entity)
    if a.dry_run:
        print(f"built report '{report.title}' with {len(report.blocks)} blocks (not saved)")
        return
    report.save()
    print(report.url)


if __name__ == "__main__":
    main()
