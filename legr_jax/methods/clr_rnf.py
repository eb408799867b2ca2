"""``clr_rnf``: placeholder until the CLR-RNF module lands."""
