"""Quantizing a checkpoint: the settings (settings.py), calibration text (calibration.py), the GPTQ and AWQ passes
over one decoder layer (gptq_layer.py, awq_layer.py, on layers.py's shared helpers) and the pipeline that runs them
layer by layer and saves the result (pipeline.py). The model-agnostic algorithms live in qwen2cli.quant."""
