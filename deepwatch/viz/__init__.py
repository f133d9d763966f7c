"""Pictures of what a model does: Sankey of true type -> verdict, t-SNE map, the HTML report.

plotly loads only inside the functions that draw, so importing this package is cheap.
"""
