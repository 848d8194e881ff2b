"""Files: checkpoint readers (.bin / .safetensors) and the artifact layout."""
