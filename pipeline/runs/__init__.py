"""The run store: one folder per run, named by the hash of its semantic config.

ids.py       the run id (semantic_config, run_id) and the keys left out of it
files.py     atomic writes (temporary file, fsync, rename) and the readers of damaged files
history.py   metrics.csv: its columns, writer and one reader
rundir.py    RunDir: a run's folder and every write to it, fenced by its lease
lease.py     the one live owner of a run (a fencing token in lease.json)
integrity.py check (is the run what it claims?) and decide (start, resume, restart, skip)
state.py     the checkpoint's form (TrainState)
provenance.py  the code and machine of each attempt
migrate.py   `python -m pipeline.runs.migrate`: rename runs whose id changed
"""
