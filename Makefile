# Full-batch Adam sweeps. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP ?= toy
LAUNCHER ?= local
EXTRA ?=
RETRY ?= 0
DRY ?=
MODE ?=
WATCH ?=
JOBS ?= 2
GPUS ?=
TASKS ?=
PACK ?= auto
PROFILE ?=
DATA_ROOT ?= data
RUNS ?=
CASES ?=
SEED ?=
SWEEPS ?=
ANALYSIS_OUT ?=
PYTEST_ARGS ?=
ARGS ?=

.PHONY: help install sweep status analyze table redraw theory sync report data migrate bench fidelity gpucheck fuzz test test-fast lint clean-venv

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: SWEEP=$(SWEEP) LAUNCHER=local|basic|slurm EXTRA='<hydra overrides>' MODE=exact|paper RETRY=0|1 DRY=1 JOBS=$(JOBS) PROFILE=$(PROFILE) GPUS=<per run> TASKS=<per run> PACK=auto|<runs per process> RUNS=<runs root> SWEEPS=<sweeps root> NAME=<sweep folder> REPEATS=<runs per grid point>"
	@echo "             WATCH=<seconds> (status) ARGS='<more arguments>' (analyze, table, redraw, bench) ANALYSIS_OUT=<folder> FIG=<figure csv> STYLE=paper|talk DATA_ROOT=<folder> DATASETS='cifar10 cifar100' (data) CASES= SEED= (fuzz) PYTEST_ARGS= (test)"
	@echo "  presets (SWEEP=): $$(ls conf/sweep | sed 's/\.yaml$$//' | tr '\n' ' ')"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install the project (torch, hydra, submitit, wandb, pandas, ...)

# Every value a user gives (SWEEP, EXTRA, RUNS, ARGS, ...) reaches the recipes through the environment,
# never pasted into the shell's text: "$$VAR" is one word; $$EXTRA and $$ARGS are split into words at
# blanks (with globbing off: set -f) and nothing in them is run -- Hydra's range(3), choice(a,b), a ';'
# or a '$$(...)' arrive as written.
export CASES SEED PYTEST_ARGS SWEEP LAUNCHER EXTRA RETRY DRY MODE WATCH JOBS GPUS TASKS PACK PROFILE DATA_ROOT RUNS SWEEPS ANALYSIS_OUT ARGS DATASETS NAME REPEATS FIG STYLE
# the default folders live in conf/train.yaml (paths.runs, paths.sweeps); RUNS=/SWEEPS= override them
# MODE=paper: the authors' setting on top of the preset (conf/mode/paper.yaml; its sweep folder is <SWEEP>-paper)
# NAME=: the sweep folder's name (else the preset's, and <preset>.<6 hex> for a sweep whose EXTRA changes
# settings); REPEATS=K: each grid point K times (conf/train.yaml sweep.repeats, sweep.repeat_by)
PATHS = $${RUNS:+"paths.runs=$$RUNS"} $${SWEEPS:+"paths.sweeps=$$SWEEPS"} $${MODE:+"mode=$$MODE"} \
	$${NAME:+"sweep.name=$$NAME"} $${REPEATS:+"sweep.repeats=$$REPEATS"} $$EXTRA
WHERE = $(PY) -m pipeline.dispatch.sweep where "$$SWEEP"

sweep: $(VENV)/.installed ## run a sweep preset of conf/sweep/ (default SWEEP=toy); LAUNCHER=local|basic|slurm, DRY=1 plans only
	set -f; $(PY) -m pipeline.dispatch.sweep run "$$SWEEP" --launcher "$$LAUNCHER" --jobs "$$JOBS" --profile "$$PROFILE" \
		--retry "$$RETRY" --dry "$$DRY" --gpus "$$GPUS" --tasks "$$TASKS" --pack "$$PACK" -- $(PATHS)

status: $(VENV)/.installed ## table of the runs of SWEEP: state, step, loss, perturbed norm, test accuracy, job (WATCH=10: again until done)
	set -f; $(PY) -m pipeline.dispatch.sweep status "$$SWEEP" --watch "$$WATCH" -- $(PATHS)

analyze: $(VENV)/.installed ## summary.csv, curves.parquet and figures for SWEEP (ARGS="--at-step 900 --smooth 5 --csv")
	set -f; dir=$$($(WHERE) -- $(PATHS)) && store=$$($(WHERE) --store -- $(PATHS)) && \
	$(PY) -m analysis "$$dir" $${ANALYSIS_OUT:+--out "$$ANALYSIS_OUT"} $$store $$ARGS

table: $(VENV)/.installed ## a LaTeX/Markdown/CSV table of SWEEP's summary.csv (ARGS="--rows beta --cols rho --value at_loss_0.01_pert_norm --markdown")
	set -f; dir=$$($(WHERE) -- $(PATHS)) && $(PY) -m analysis.table "$$dir/analysis" $$ARGS

redraw: $(VENV)/.installed ## a figure again from its CSV (FIG=sweeps/x/analysis/<figure>.csv STYLE=talk: <figure>_talk.png beside it)
	set -f; $(PY) -m analysis.redraw "$$FIG" --style "$${STYLE:-paper}" $$ARGS

theory: $(VENV)/.installed ## verify the modified ODEs of Theorems 3.1/4.2 numerically, draw Figures 1-3
	$(PY) -m analysis.theory verify
	$(PY) -m analysis.theory example23
	$(PY) -m analysis.theory figures --out figures/theory

sync: $(VENV)/.installed ## upload the offline wandb runs of SWEEP's own runs (those of its plan.json)
	set -f; mapfile -t runs < <($(WHERE) --wandb -- $(PATHS)) && \
	if [ $${#runs[@]} -eq 0 ]; then echo "no offline wandb runs of sweep $$SWEEP under $$($(WHERE) --runs -- $(PATHS))"; else $(VENV)/bin/wandb sync "$${runs[@]}"; fi

report: $(VENV)/.installed ## build a W&B report for SWEEP (needs the network)
	$(PY) -m analysis.report "$$SWEEP" $(if $(DRY),--dry-run)

DATASETS ?= cifar10 cifar100
data: $(VENV)/.installed ## download CIFAR-10 and CIFAR-100 (DATASETS="cifar10 eurosat": those) into DATA_ROOT, for offline compute nodes
	set -f; $(PY) -m pipeline.engine.data "$$DATA_ROOT" $$DATASETS

migrate: $(VENV)/.installed ## rename run directories to their current ids (runs made before the micro-batch left the id)
	set -f; $(PY) -m pipeline.runs.migrate "$$($(WHERE) --runs -- $(PATHS))" "$$(dirname "$$($(WHERE) -- $(PATHS))")"

bench: $(VENV)/.installed ## pipeline step vs bare and authors' loops, end-to-end run cost, W=1 vs W=2, thread budget, start-up, packed runs and whole sweeps (ARGS=--all-precisions: every switch)
	set -f; $(PY) -m bench.step_bench $$ARGS
	$(if $(ARGS),,$(PY) -m bench.run_bench)
	$(if $(ARGS),,$(PY) -m bench.dist_bench)
	$(if $(ARGS),,$(PY) -m bench.threads_bench)
	$(if $(ARGS),,$(PY) -m bench.startup_bench)
	$(if $(ARGS),,$(PY) -m bench.pack_bench --busy --regime)
	$(if $(ARGS),,$(PY) -m bench.sharpness_bench)

fidelity: $(VENV)/.installed ## each precision against fp64 beside an fp32 ensemble perturbed by one ulp (CASES=mlp-spike ...; ARGS="--ensemble 4") -> fidelity/
	set -f; $(PY) -m analysis.fidelity $$CASES $$ARGS

gpucheck: $(VENV)/.installed ## one-shot GPU check (< 8 min): exactness, speed grid, auto micro-batch, ratios -> gpucheck/gpucheck.md
	set -f; $(PY) -m bench.gpucheck --out gpucheck $$ARGS

fuzz: $(VENV)/.installed ## the run-store fuzzer: CASES=N cases of random damage (default 200), seeds from the clock (SEED=S replays)
	$(PY) -m tests.fuzz --cases "$${CASES:-200}" $${SEED:+--seed "$$SEED"}

test: $(VENV)/.installed ## run the test suite (Slurm tests use a running cluster or start slurm/local_cluster.sh)
	set -f; $(PY) -m pytest -q $$PYTEST_ARGS

test-fast: $(VENV)/.installed ## the fast tier: every test but the slow and Slurm ones (a few minutes on 2 cores)
	set -f; $(PY) -m pytest -q -m "not slow and not slurm" $$PYTEST_ARGS

lint: $(VENV)/.installed ## ruff
	$(VENV)/bin/ruff check .

clean-venv: ## remove .venv
	rm -rf $(VENV)
