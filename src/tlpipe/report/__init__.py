"""Show what the network learned: activations, filter patterns, Grad-CAM, curves and an HTML report.

Modules: `activations`, `filters`, `gradcam`, `curves`, `report` (HTML page, confusion heatmaps),
`build` (the visualize stage's work), with helpers `graph` (finding layers in nested or flattened
models) and `plotting` (deterministic, atomic PNG writing and grids).
"""
