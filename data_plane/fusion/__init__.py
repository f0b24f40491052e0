"""Runtime fusion of adapters: merges (TIES, DARE, magnitude pruning) built into one derived adapter."""
