"""The decoder model, its named sizes and Hugging Face checkpoint conversion."""
