"""tinyddpm: a small, readable PyTorch package for DDPM/DDIM diffusion, DCGAN and FID."""
__version__ = "0.1.0"
