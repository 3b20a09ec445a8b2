"""sslops-train: a thin SimCLR trainer (ffcv decode once, sslops.augment views, sslops.nt_xent)."""
