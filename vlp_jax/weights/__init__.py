"""Import and export of pretrained weights (open_clip, Hugging Face, timm)."""
