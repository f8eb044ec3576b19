"""The model side: checkpoint config and tensors, weight packing, output heads, and the BitNet graph in Relax."""
