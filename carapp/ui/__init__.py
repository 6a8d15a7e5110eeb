"""The Gradio app: one module per tab; every handler calls plain functions of the core."""
