"""lmlab's Hydra sweeper plugins (Hydra finds plugins only under `hydra_plugins`)."""
