"""Weight-only quantization: int8, int4 (round-to-nearest or GPTQ) and NF4; `lmforge quantize` is run.py.

from lmforge.quant import calibration_ids, load_quantized, quantize_model, save_quantized
model = quantize_model(model, "int4-gptq", group_size=128, calib=calibration_ids(tokens, n=128, seq_len=256))
save_quantized(model, "runs/demo/int4", tokenizer=tok)
model = load_quantized("runs/demo/int4")
"""

from lmforge.quant.calibrate import calibration_ids
from lmforge.quant.io import QUANT_CONFIG, is_quantized_dir, load_quantized, save_quantized
from lmforge.quant.quantize import METHODS, QuantSpec, quantize_model

__all__ = [
    "METHODS",
    "QUANT_CONFIG",
    "QuantSpec",
    "calibration_ids",
    "is_quantized_dir",
    "load_quantized",
    "quantize_model",
    "save_quantized",
]
