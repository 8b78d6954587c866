"""ControlNet-as-a-Service (DESIGN.md §2): a shared ControlNet model that runs beside the UNet encoder half."""
