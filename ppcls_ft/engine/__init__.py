"""Training, evaluation and export engine: config -> objects -> loop -> checkpoints -> inference model.

Each concern is one module beside this file (builder, trainer, checkpoint, strategies, diagnosis,
export); import them directly, e.g. ``from ppcls_ft.engine.export import export_inference_model``.
"""
