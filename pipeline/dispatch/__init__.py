"""Sweeps: plan a grid into runs (plan.py), submit what is to be done (sweep.py: `make sweep`,
`make status`) locally or to Slurm (slurm.py: site profiles, sacct), and never leave a job the
store does not know (orphans.py)."""
