"""ControlNet-as-a-Service (docs/architecture.md): a shared ControlNet model that runs beside the UNet encoder half."""
