"""One module per Triton model of the pipeline: ``text_encoder``, ``denoise``, ``unet``, ``vae`` (and the baseline)."""
