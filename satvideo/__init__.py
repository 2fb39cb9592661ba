"""satvideo: a SwissArmyTransformer-style framework for CogVideoX-class video diffusion."""
