"""EfficientSAM (ViT-Ti, ViT-S) as fluxion chains: its ViT encoder, its prompt encoder and mask decoder (a variant of
SAM's, built from SAM's parts where they are the same), the model with the official processing."""
