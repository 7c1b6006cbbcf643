"""Weight-only quantization: int8, int4 (round-to-nearest or GPTQ) and NF4; `lmforge quantize` is run.py.

from lmforge.quant import calibration_ids, quantize_model
from lmforge.model.quant import load_quantized, save_quantized
model = quantize_model(model, "int4-gptq", group_size=128, calib=calibration_ids(tokens, n=128, seq_len=256))
save_quantized(model, "runs/demo/int4", tokenizer=tok)
model = load_quantized("runs/demo/int4")

The quantized layers and the folder format they are saved in live in `lmforge.model.quant` (loading needs them);
this package holds the algorithms that choose the codes, the report and the command.
"""

from lmforge.quant.calibrate import calibration_ids
from lmforge.quant.quantize import quantize_model

__all__ = ["calibration_ids", "quantize_model"]
