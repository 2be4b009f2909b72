"""What a run is: its config composed the way Hydra composes it (compose.py) and every key
checked, with one line naming the key and what is allowed (validate.py); what user code
behind `_target_` returns (user_outputs.py); which points may share a process (pack.py)."""
