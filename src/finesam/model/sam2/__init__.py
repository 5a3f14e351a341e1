"""SAM 2 / SAM 2.1 as fluxion chains: the Hiera encoder with its FPN neck, the SAM 2 mask decoder, the model."""
