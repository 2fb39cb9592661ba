"""Work on one sample spread over several ranks: sequence-parallel transformer (sequence.py), the ranks' layout
(layout.py), CFG-parallel denoising (cfg.py) and the context-parallel VAE (context_vae.py)."""
