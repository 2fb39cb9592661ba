"""Weight conversion between the official SAT layouts and diffusers."""
