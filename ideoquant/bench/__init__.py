"""`ideoquant bench`: image-level quality of quantized variants against the reference, the way the study judged it."""
