"""(IA)^3: ``config`` (IA3Config), ``op`` (the fused op), ``layer`` (IA3Linear), ``method``."""
