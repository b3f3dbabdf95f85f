"""Mixture-of-Experts decoders (issue 28; contract part 3 §15; docs/contract.md, "Mixture-of-Experts").

Not a registered feature yet: no MoE graph is written on any target. What is here:
- ``layout``: the expert weight bytes of ``Int4MoePlugin`` (Marlin) and FC1's row order per plugin;
The CPU reference of both plugins is ``reference/moe.py``.
"""
