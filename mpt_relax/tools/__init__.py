"""Tools on top of the library: bf16 -> fp16 conversion, bench, bandwidth bound, demo."""
