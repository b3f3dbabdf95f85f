"""Verification of a rewritten folder against transformers on the CPU reference: the comparison
rules (`compare`), the LLM (`llm`) and VLM (`vlm`) routes, the RoPE check and the graph checks."""
