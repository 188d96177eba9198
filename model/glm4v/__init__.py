"""GLM-4V-9B (EVA2-CLIP-E tower + conv downsample + GLU adapter + GLM-4-9B decoder), our own modelling code
without remote code."""
