"""The engine: what one run computes, on one device or W ranks.

loop.py      the training loop (train_loop), on one screen
step.py      the full-batch gradient and the step's metrics (one host sync: to_host)
optim.py     Adam, RMSProp, momentum as in Definitions 2.1 and 4.1
numerics.py  device, precision switches, autocast
data.py      the datasets, as tensors on the device
dist.py      W ranks: the sums of a step in as few collectives as possible
preempt.py   Slurm's warning signal: checkpoint, then hand over
theory_metrics.py  the bias term of Theorem 3.1/4.2 measured on a model
loggers.py   the wandb mirror of metrics.csv
progress.py  the progress line
"""
