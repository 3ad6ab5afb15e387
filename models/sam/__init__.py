"""SAM and SAM 2 modules: torch.nn only."""
