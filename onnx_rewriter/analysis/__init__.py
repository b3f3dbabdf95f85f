"""What a graph says about its model: dimensions, RoPE maths, constant snapping, the mask probe."""
