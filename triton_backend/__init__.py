"""SwiftDiffusion: serve diffusion workflows (base model + ControlNets + LoRAs) from NVIDIA Triton.

The Triton ``model.py`` files under ``model_repository/`` are thin: they convert tensors and call into this
package, which holds all the logic and is testable without a server.
"""

__version__ = "0.1.0"
