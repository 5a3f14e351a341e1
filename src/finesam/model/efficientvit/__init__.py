"""EfficientViT-SAM (mit-han-lab): the EfficientViT encoder with SAM's prompt encoder and decoder."""
